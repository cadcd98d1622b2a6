"""Integer products for prompts: T tokens times a quantized matrix with the CPU's byte dot product.

A prompt's tokens are quantized as decode quantizes one token (`intdot.quantize_activations`:
int8 per block of 32, d = max|x| / 127), so the prompt and the steps after it compute the same
integers. The weights' integer values are laid out a panel of rows at a time, in the order the
instruction reads them: for a group of L rows (16 for a 512-bit register, 8 for 256, 4 for 128), 4 values of
each row side by side, then the next 4, ...

    panel [groups][cols/4][L][4] bytes,  scales [groups][cols/sub][L],  biases [groups][cols/sub][L]

One `vpdpbusd` then multiplies 4 values of 16 rows by 4 activations of one token (broadcast from
memory) into 16 int32 lanes, one per row. The micro-kernel keeps MR groups of rows times NR tokens
of integer sums in registers over a run of `sub` values (one weight scale), then scales them into
float sums: 8 instructions of integer work per (16 rows, token, run of 32), 3 of float. A float32
product (the BLAS path) does 32 multiply-adds per 16 rows and token for the same values.

    y[t, r] = sum_s wd[r, s] xd[t, s] (v[r, s, :] . xq[t, s, :]) + sum_b offset[r, b] xsum[t, b]

`vpdpbusd` takes unsigned bytes times signed ones: the activations go in as xq + 128 and the
integer sums start from -128 x (the sum of the run's weight values), kept with the panel. AVX2
has no such instruction: `vpmaddubsw` (pairs to int16) then `vpmaddwd` by ones, with the
weights' absolute values and their signs moved onto the activations (`vpsignb`; activations are
within +-127, so no pair passes 128 x 127 x 2 < 2^15), as llama.cpp's AVX2 products do.

Offsets (Q4_1, Q4_K, ...: weights = scale x q + offset, q >= 0) are added in the same loop, each
times the sum of its run of activations as rounded (xsum = xd x the sum of xq), so that the whole
product is the weights times the rounded activations, as llama.cpp's Q8_1 sums make it. (The exact
float sums leave the rounding error to meet scale x q alone, all of one sign and up to twice as
large as the weights: SmolLM2's perplexity was 18.58 with them, 18.30 with float32 activations.)
Q2_K's offsets, per 16 values, are added with BLAS.

Each thread packs a panel (a few tens of kilobytes, from the weight's own layout: Q8_0 / Q5_0
blocks, nibbles or int8 rows) and runs every token over it while it is in its cache. On ARM the
groups are 4 rows (128-bit NEON) and the instruction `usdot` with I8MM (as `vpdpbusd`, with the
biases), `sdot` with DotProd alone (signed times signed, no biases, as AVX2). ARM cannot run here,
so those kernels are compile-tested, and their layout is run on any machine by the portable path,
whose plain LLVM vectors compute what `sdot` does (by default the portable path keeps float32
BLAS: `available`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..formats.quants import GGMLType
from . import isa as isas
from .blocks import BlockWeight
from .int4 import Int4Weight
from .int8 import Int8Weight, q5_0_values
from .intdot import BLOCK, Q5_0_BYTES, Q8_0_BYTES, quantize_row_intrinsic
from .ir import (
    F32,
    I8,
    I32,
    I64,
    broadcast,
    const,
    counted_loop,
    declare,
    emit_assembly,
    fadd,
    fmul,
    indices,
    load,
    splat,
    store,
    vec,
)
from .memory import load_f16

# path -> (lanes a register, MR groups of rows, NR tokens) a micro-kernel step
SHAPES = {
    "avx512vnni": (16, 2, 4),
    "avxvnni": (8, 2, 2),
    "avx2": (8, 1, 4),
    "i8mm": (4, 2, 3),  # NEON's 32 registers of 128 bits: 2 x 4 spilled a vector a run
    "dotprod": (4, 2, 3),
    "portable": (4, 2, 3),
}
# vpdpbusd, usdot (I8MM): unsigned activations times signed weights, so activations go in as xq + 128
# and the weights' sums as biases; the others (AVX2's pairs, sdot, plain vectors) take both signed
UNSIGNED_PATHS = frozenset({"avx512vnni", "avxvnni", "i8mm"})
ISA = isas.PATH


def available(path: str = ISA) -> bool:
    """Whether prompts are multiplied in integers on this path by default (else float32 BLAS).
    The portable path has the kernels (they check the others' layouts on any machine) but its
    plain vectors ran 5x slower than BLAS's float32 product here (SmolLM2, 85.6 against 420.7 tok/s)."""
    return path in SHAPES and path != "portable"


# -- the micro-kernel as LLVM IR ----------------------------------------------------------------


# The weights a panel holds, for AVX2's int16 pairs (the other paths take any int8 weights alike):
# any int8 values (-128..127: one step of 4 values per int16 sum, 128 x 127 x 2 < 2^15), nibbles
# (0..15, unsigned: no sign to move, and a whole run of 32 in int16, 8 x 15 x 127 x 2 < 2^15), or
# Q5_0's values (-16..15: a whole run, 8 x 16 x 127 x 2 < 2^15).
FULL, NIBBLES, FIVE_BITS = 0, 1, 2
_STEPS_IN_INT16 = {FULL: 1, NIBBLES: 8, FIVE_BITS: 8}
I16 = ir.IntType(16)


def _pairs_avx2(builder, x, w, weights):
    """<16 x i16>: sums of 2 of x (signed activation bytes) times w (weight bytes), `vpmaddubsw`
    (unsigned x signed): the weights' magnitudes times the activations with the weights' signs."""
    t8 = vec(I8, 32)
    w8, x8 = builder.bitcast(w, t8), builder.bitcast(x, t8)
    if weights != NIBBLES:  # |w| (-128 -> 128 as an unsigned byte), x with w's signs (|x| <= 127)
        sign = declare(builder, "llvm.x86.avx2.psign.b", t8, [t8, t8])
        w8, x8 = builder.call(sign, [w8, w8]), builder.call(sign, [x8, w8])
    return builder.call(declare(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), [t8, t8]), [w8, x8])


def _quads_avx2(builder, pairs):
    """<16 x i16> -> <8 x i32>: sums of adjacent pairs (`vpmaddwd` by ones)."""
    t16 = vec(I16, 16)
    return builder.call(
        declare(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [t16, t16]), [pairs, splat(I16, 16, 1)]
    )


def _dot4(builder, path, acc, x, w):
    """acc <L x i32> + sums of 4 of x (activation bytes) times w (signed weight bytes): `vpdpbusd`
    or ARM's `usdot` (x unsigned: xq + 128), `sdot` (both signed), or on the portable path plain
    LLVM vectors (widen, multiply, add groups of 4: what `sdot` computes)."""
    lanes = acc.type.count
    t, t8 = vec(I32, lanes), vec(I8, 4 * lanes)
    if path in ("avx512vnni", "avxvnni"):
        name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"
        return builder.call(
            declare(builder, name, t, [t, t, t]), [acc, builder.bitcast(x, t), builder.bitcast(w, t)]
        )
    x8, w8 = builder.bitcast(x, t8), builder.bitcast(w, t8)
    if path == "i8mm":  # usdot: the first bytes unsigned (activations + 128), the second signed
        return builder.call(
            declare(builder, "llvm.aarch64.neon.usdot.v4i32.v16i8", t, [t, t8, t8]), [acc, x8, w8]
        )
    if path == "dotprod":  # sdot: both signed, as they are
        return builder.call(
            declare(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", t, [t, t8, t8]), [acc, w8, x8]
        )
    products = builder.mul(builder.sext(x8, vec(I32, 4 * lanes)), builder.sext(w8, vec(I32, 4 * lanes)))
    parts = [builder.shuffle_vector(products, products, indices(range(k, 4 * lanes, 4))) for k in range(4)]
    return builder.add(acc, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))


def _micro_kernel(
    builder,
    path,
    sub,
    with_offsets,
    weights,
    panel,
    scales,
    biases,
    offsets,
    xq,
    xd,
    xs,
    out,
    token,
    column,
    stride,
    cols,
):
    """out[token + t, column + m L + lane] = the sums of MR groups of rows (a packed panel) times
    NR tokens, over `cols` values (pointers and i64 values); `with_offsets`: plus the panel's
    offsets per run of 32 times the activations' sums (`xs`); `weights` what the panel holds
    (FULL, NIBBLES, FIVE_BITS: how long AVX2 may sum in int16)."""
    lanes, mr, nr = SHAPES[path]
    n_sub = builder.udiv(cols, const(sub))
    n_blocks = builder.udiv(cols, const(BLOCK))
    group_bytes = builder.mul(cols, const(lanes))
    rows_t = vec(I32, lanes)

    def run(builder, s, accs):
        integer, pairs = [], []
        for m in range(mr):
            at = builder.mul(builder.add(builder.mul(const(m), n_sub), s), const(lanes))
            start = (
                load(builder, biases, at, rows_t, 4) if path in UNSIGNED_PATHS else ir.Constant(rows_t, None)
            )
            integer.append([start] * nr)
            pairs.append([None] * nr)
        steps = min(_STEPS_IN_INT16[weights], sub // 4)
        for j in range(sub // 4):
            k4 = builder.add(builder.mul(s, const(sub // 4)), const(j))
            panel_rows = [
                load(
                    builder,
                    panel,
                    builder.add(builder.mul(const(m), group_bytes), builder.mul(k4, const(4 * lanes))),
                    vec(I8, 4 * lanes),
                )
                for m in range(mr)
            ]
            for t in range(nr):
                at = builder.add(builder.mul(builder.add(token, const(t)), cols), builder.mul(k4, const(4)))
                x = builder.shuffle_vector(
                    builder.insert_element(
                        ir.Constant(rows_t, None), load(builder, xq, at, I32), ir.Constant(I32, 0)
                    ),
                    ir.Constant(rows_t, None),
                    ir.Constant(vec(I32, lanes), [0] * lanes),
                )
                for m in range(mr):
                    if path != "avx2":
                        integer[m][t] = _dot4(builder, path, integer[m][t], x, panel_rows[m])
                        continue  # (int32 sums from the start: no int16 pairs to keep from overflowing)
                    step = _pairs_avx2(builder, x, panel_rows[m], weights)
                    pairs[m][t] = step if pairs[m][t] is None else builder.add(pairs[m][t], step)
                    if (j + 1) % steps == 0:  # int16 sums to int32 before they could overflow
                        integer[m][t] = builder.add(integer[m][t], _quads_avx2(builder, pairs[m][t]))
                        pairs[m][t] = None
        block = builder.udiv(builder.mul(s, const(sub)), const(BLOCK))
        updated = []
        for m in range(mr):
            at = builder.mul(builder.add(builder.mul(const(m), n_sub), s), const(lanes))
            row_scales = load(builder, scales, at, vec(F32, lanes), 4)
            for t in range(nr):
                d = load(
                    builder, xd, builder.add(builder.mul(builder.add(token, const(t)), n_blocks), block), F32
                )
                scale = fmul(builder, row_scales, broadcast(builder, d, lanes))
                value = fmul(builder, builder.sitofp(integer[m][t], vec(F32, lanes)), scale)
                if with_offsets:
                    total = load(
                        builder,
                        xs,
                        builder.add(builder.mul(builder.add(token, const(t)), n_blocks), block),
                        F32,
                    )
                    row_offsets = load(builder, offsets, at, vec(F32, lanes), 4)
                    value = fadd(builder, value, fmul(builder, row_offsets, broadcast(builder, total, lanes)))
                updated.append(fadd(builder, accs[m * nr + t], value))
        return updated

    initial = [ir.Constant(vec(F32, lanes), None)] * (mr * nr)
    sums = counted_loop(builder, n_sub, initial, run)
    for m in range(mr):
        for t in range(nr):
            at = builder.add(
                builder.mul(builder.add(token, const(t)), stride), builder.add(column, const(m * lanes))
            )
            store(builder, sums[m * nr + t], out, at, 4)


# (run length, offsets, weights) of the micro-kernels built: offsets come with runs of 32 only
# (Q4_1, Q4_K, Q5_1, Q5_K; nibbles always have them); the one type with offsets per 16 (Q2_K) adds
# them with BLAS.
VARIANTS = (
    (16, False, FULL),
    (32, False, FULL),
    (32, True, FULL),
    (32, True, NIBBLES),
    (32, False, FIVE_BITS),
)
NAMES = ("run16", "run32", "run32_offsets", "run32_nibbles", "run32_q5_0")
_POINTERS = (I8, F32, I32, F32, I8, F32, F32, F32)  # panel, scales, biases, offsets, xq, xd, xs, out


def assembly(path: str, triple: str = "x86_64-unknown-linux-gnu", cpu: str = "", features: str = "") -> str:
    """The micro-kernels of a path compiled for a target, as assembly."""
    module = ir.Module(name=f"intgemm_{path}")
    for name, variant in zip(NAMES, VARIANTS):
        kind = ir.FunctionType(ir.VoidType(), [t.as_pointer() for t in _POINTERS] + [I64] * 4)
        function = ir.Function(module, kind, name)
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        _micro_kernel(builder, path, *variant, *function.args)
        builder.ret_void()
    return emit_assembly(module, triple, cpu, features)


# -- numba: the micro-kernel, packing, the driver -------------------------------------------------


def _kernel(path: str, sub: int, with_offsets: bool, weights: int):
    @intrinsic
    def micro(typingctx, panel, scales, biases, offsets, xq, xd, xs, out, token, column, stride, cols):
        """The sums of one packed panel times NR tokens from `token`, written to out (flat
        [tokens, stride]) at `column`."""
        arrays = (panel, scales, biases, offsets, xq, xd, xs, out)
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
            return None
        signature = types.void(*arrays, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, sig, args):
            data = [context.make_array(t)(context, builder, v).data for t, v in zip(sig.args[:8], args[:8])]
            data = [builder.bitcast(d, t.as_pointer()) for d, t in zip(data, _POINTERS)]
            _micro_kernel(builder, path, sub, with_offsets, weights, *data, *args[8:])
            return context.get_dummy_value()

        return signature, codegen

    return micro


LANES, MR, NR = SHAPES.get(ISA, (16, 2, 1))
PANEL = LANES * MR  # rows a panel
_micro16, _micro32, _micro32_offsets, _micro32_nibbles, _micro32_q5_0 = (_kernel(ISA, *v) for v in VARIANTS)
_UNSIGNED = ISA in UNSIGNED_PATHS  # activations go in as xq + 128, with the weights' sums as biases


@njit(inline="always")
def _buffers(cols, sub):
    """A zeroed panel, its scales, biases and offsets, and a row of values."""
    n_sub = cols // sub
    return (
        np.zeros(PANEL * cols, np.int8),
        np.zeros(PANEL * n_sub, np.float32),
        np.zeros(PANEL * n_sub, np.int32),
        np.zeros(PANEL * n_sub, np.float32),
        np.empty(cols, np.int8),
    )


@njit(inline="always")
def _place(values, i, sub, panel, biases):
    """Row i of a panel: its values 4 by 4 into the lanes of its group, the bias of each run.
    (Indices are unsigned: see kernels.memory.)"""
    cols = values.size
    group, lane = i // LANES, i % LANES
    words, panel_words = values.view(np.int32), panel.view(np.int32)
    base = np.uint64(group * (cols // 4) * LANES + lane)
    for k in range(cols // 4):
        panel_words[base + np.uint64(k * LANES)] = words[np.uint64(k)]
    if _UNSIGNED:
        n_sub = cols // sub
        for s in range(n_sub):
            total = np.int32(0)
            for j in range(sub):
                total += np.int32(values[np.uint64(s * sub + j)])
            biases[np.uint64((group * n_sub + s) * LANES + lane)] = np.int32(-128) * total


@njit(inline="always")
def _set_scale(scales, i, s, n_sub, value):
    scales[((i // LANES) * n_sub + s) * LANES + i % LANES] = value


@njit(inline="always")
def _run(panel, scales, biases, offsets, xq, xd, xs, out, tokens, first, cols, sub, with_offsets, weights):
    """Every block of NR tokens over one packed panel."""
    stride = out.size // tokens
    for t in range(0, tokens, NR):
        if sub == 16:
            _micro16(panel, scales, biases, offsets, xq, xd, xs, out, t, first, stride, cols)
        elif weights == NIBBLES:
            _micro32_nibbles(panel, scales, biases, offsets, xq, xd, xs, out, t, first, stride, cols)
        elif weights == FIVE_BITS:
            _micro32_q5_0(panel, scales, biases, offsets, xq, xd, xs, out, t, first, stride, cols)
        elif with_offsets:
            _micro32_offsets(panel, scales, biases, offsets, xq, xd, xs, out, t, first, stride, cols)
        else:
            _micro32(panel, scales, biases, offsets, xq, xd, xs, out, t, first, stride, cols)


@njit(parallel=True, cache=True)
def _gemm_int8(q, scale, offset, xq, xd, xs, out, tokens):
    """Int8 rows (kernels.int8); offsets (per run of 32) are added here when `offset` has columns."""
    rows, cols = q.shape
    sub = cols // scale.shape[1]
    n_sub = cols // sub
    with_offsets = offset.shape[1] > 0
    for p in prange((rows + PANEL - 1) // PANEL):
        panel, scales, biases, offsets, values = _buffers(cols, sub)
        for i in range(min(PANEL, rows - p * PANEL)):
            r = p * PANEL + i
            row = q[r]
            for k in range(cols):
                values[np.uint64(k)] = row[np.uint64(k)]
            for s in range(n_sub):
                _set_scale(scales, i, s, n_sub, scale[r, s])
                if with_offsets:
                    _set_scale(offsets, i, s, n_sub, offset[r, s])
            _place(values, i, sub, panel, biases)
        _run(
            panel, scales, biases, offsets, xq, xd, xs, out, tokens, p * PANEL, cols, sub, with_offsets, FULL
        )


@njit(parallel=True, cache=True)
def _gemm_nibbles(packed, scale, offset, xq, xd, xs, out, tokens):
    rows, cols = packed.shape[0], packed.shape[1] * 2
    n_sub = cols // 32
    for p in prange((rows + PANEL - 1) // PANEL):
        panel, scales, biases, offsets, values = _buffers(cols, 32)
        for i in range(min(PANEL, rows - p * PANEL)):
            r = p * PANEL + i
            row = packed[r]
            for g in range(cols // 64):
                for j in range(32):
                    b = row[np.uint64(g * 32 + j)]
                    values[np.uint64(g * 64 + j)] = np.int8(b & 15)
                    values[np.uint64(g * 64 + 32 + j)] = np.int8(b >> 4)
            for s in range(n_sub):
                _set_scale(scales, i, s, n_sub, scale[r, s])
                _set_scale(offsets, i, s, n_sub, offset[r, s])
            _place(values, i, 32, panel, biases)
        _run(panel, scales, biases, offsets, xq, xd, xs, out, tokens, p * PANEL, cols, 32, True, NIBBLES)


@njit(parallel=True, cache=True)
def _gemm_blocks(blocks, q5, xq, xd, xs, out, tokens):
    block_bytes = Q5_0_BYTES if q5 else Q8_0_BYTES
    rows, n_sub = blocks.shape[0], blocks.shape[1] // block_bytes
    cols = n_sub * BLOCK
    for p in prange((rows + PANEL - 1) // PANEL):
        panel, scales, biases, offsets, values = _buffers(cols, BLOCK)
        for i in range(min(PANEL, rows - p * PANEL)):
            row = blocks[p * PANEL + i]
            for b in range(n_sub):
                start = b * block_bytes
                _set_scale(scales, i, b, n_sub, load_f16(row, start))
                if q5:
                    for j in range(16):
                        low, high = q5_0_values(row, start, j)
                        values[b * BLOCK + j] = np.int8(low)
                        values[b * BLOCK + 16 + j] = np.int8(high)
                else:
                    for j in range(BLOCK):
                        values[np.uint64(b * BLOCK + j)] = np.int8(row[np.uint64(start + 2 + j)])
            _place(values, i, BLOCK, panel, biases)
        _run(
            panel,
            scales,
            biases,
            offsets,
            xq,
            xd,
            xs,
            out,
            tokens,
            p * PANEL,
            cols,
            BLOCK,
            False,
            FIVE_BITS if q5 else FULL,
        )


_quantize_row = quantize_row_intrinsic(128 if _UNSIGNED else 0, False)


@njit(parallel=True, cache=True)
def _quantize_tokens(x, xq, xd, xs):
    """x [T, cols] -> xq (flat [tokens, cols] bytes: int8, or + 128 as unsigned bytes), xd and
    xs (flat [tokens, cols / 32]: scales, sums), as `intdot.quantize_activations` rounds one
    token; rows past T stay."""
    tokens, cols = x.shape
    for t in prange(tokens):
        _quantize_row(x[t], xq, xd, xs, xs, t * cols, t * (cols // BLOCK))


Packed = Int8Weight | Int4Weight | BlockWeight


def supports(w) -> bool:
    """Whether a weight's prompt products can be integer here (a kernel for the path, and a width
    of whole blocks)."""
    if ISA not in SHAPES or not isinstance(w, Packed):
        return False
    return w.shape[1] % (64 if isinstance(w, Int4Weight) else BLOCK) == 0


def matmul(w: Packed, x: np.ndarray) -> np.ndarray:
    """x [T, cols] @ W.T -> [T, rows] (float32), x rounded to int8 blocks as decode rounds it."""
    rows, cols = w.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    count = len(x)
    tokens = -(-count // NR) * NR
    xq = np.zeros(tokens * cols, np.uint8)
    xd = np.zeros(tokens * (cols // BLOCK), np.float32)
    xs = np.zeros(tokens * (cols // BLOCK), np.float32)
    _quantize_tokens(x, xq, xd, xs)
    padded = -(-rows // PANEL) * PANEL
    out = np.empty(tokens * padded, np.float32)
    rest = None  # offsets the kernels do not add: per 16 values
    if isinstance(w, Int8Weight):
        fused = w.offset if w.sub == 32 else w.offset[:, :0]
        rest = w.offset if w.sub == 16 and w.offset.shape[1] else None
        _gemm_int8(w.q, w.scale, fused, xq, xd, xs, out, tokens)
    elif isinstance(w, Int4Weight):
        _gemm_nibbles(w.packed, w.scale, w.offset, xq, xd, xs, out, tokens)
    else:
        _gemm_blocks(w.blocks, w.type == GGMLType.Q5_0, xq, xd, xs, out, tokens)
    y = out.reshape(tokens, padded)[:count, :rows]
    if rest is not None:  # the offsets times the sums of x as rounded over their runs
        values = xq if _UNSIGNED else xq.view(np.int8)  # xq + 128 as unsigned bytes, or signed
        rounded = (
            values.reshape(tokens, -1, BLOCK)[:count].astype(np.int32) - (128 if _UNSIGNED else 0)
        ) * xd.reshape(tokens, -1, 1)[:count]
        y += rounded.reshape(count, rest.shape[1], -1).sum(axis=2, dtype=np.float32) @ rest.T
    return y if padded == rows else np.ascontiguousarray(y)
