"""Integer dot products for decode: the activation vector quantized to int8 blocks, multiplied
with the integer weights by the CPU's byte dot-product instruction (DESIGN.md, "Speed").

With float activations the nibble kernel (`kernels.int4`) was compute-bound: converting the
weights to float took about 7 vector instructions per 16 weights, 10 Gweights/s a core, and
SmolLM2's matrices took 7 ms a token against 4 ms to read them. Quantized like llama.cpp's
Q8 activations (per block of 32 values, d = max|x| / 127, q = round(x / d)), the products are
integer: one `vpdpbusd` multiplies 64 unsigned weight bytes by 64 signed activation bytes and
sums them in groups of 4 into 16 int32 lanes. A run of 64 nibbles (32 bytes) becomes one
vector of 64 bytes (its low nibbles, then its high ones), one instruction meets it with 64
activations, and the lanes are scaled per block of 32 in float: 4x the nibble kernel's speed.
The other layouts take the same loop (`_row_dot`, 64 values a step, a half step for an odd last
block): Q5_0 blocks rebuild their values + 16 from nibbles and a mask of fifth bits, Q8_0 blocks
and int8 rows (`kernels.int8`, a scale per 16 or 32) flip the sign bit (values + 128); the bias
comes back out of the int32 lanes as bias x the activations' sums of 4, set as the dot product's
starting value.

numba types arithmetic on 8-bit integers as 64-bit (its typing rules), so this loop is not
written in numba's Python but built as LLVM IR (llvmlite) inside a numba intrinsic; the
kernels around it (threads, prefetch, offsets) stay numba. The instruction that computes the
lanes is chosen at run time from the CPU (`kernels.isa`: AVX-512 VNNI, AVX-VNNI, AVX2's
`vpmaddubsw` + `vpmaddwd`, ARM's `usdot` / `sdot`, or portable vector IR); where it cannot
take unsigned bytes up to 255 (AVX2 saturates pairs to int16, `sdot` is signed x signed), int8
weights go in signed with no bias (AVX2 takes their absolute values and moves their signs onto
the activations, `vpsignb`). `assembly` compiles a path for any target, to check the paths a
machine cannot run.

What changes numerically: the weights meet the activations as rounded to int8, an error of at
most d / 2 a value (0.4% of the block's largest), as in llama.cpp. Offsets (Q4_1, Q4_K, ...)
meet the sums of the rounded activations (d x the sum of q, as llama.cpp's Q8_1 blocks keep it),
so that the whole product is the weights times the rounded activations; with the exact float
sums the rounding error met only the scaled parts, which for these types are all of one sign
(`kernels.intgemm` has the perplexities). A prompt's products round their activations the same
way by default (`kernels.intgemm`); the float32 prompt (`prefill="f32"`) multiplies them exactly
with BLAS.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import isa as isas
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
    fmul,
    horizontal_sum,
    indices,
    load,
    splat,
    store,
    vec,
)

BLOCK = 32  # activation values per scale
Q5_0_BYTES = 22  # a Q5_0 block: f16 scale, 32 fifth bits, 16 bytes of nibbles
Q8_0_BYTES = 34  # a Q8_0 block: f16 scale, 32 int8 values

ISA = isas.PATH  # the path this process's kernels are built with


def _quantize_ir(builder, row, n_values, xq, xd, xs, xq4, at, d_at, bias):
    """Blocks of 32 floats from `row` -> int8 values q (+ bias, as bytes) at xq[at...], their
    scales d at xd[d_at...], their sums as rounded (d x the sum of q) at xs[d_at...], and with
    `xq4` the sums of q per group of 4 at xq4[8 d_at...]: d = max|x| / 127, q = rint(x / d). As IR:
    numba's loop for this did not vectorise (2.5 ns a value; this takes 0.6)."""
    t = vec(F32, BLOCK)

    def block(builder, b, _):
        values = load(builder, row, builder.mul(b, const(BLOCK)), t, 4)
        magnitude = builder.call(declare(builder, "llvm.fabs.v32f32", t, [t]), [values])
        amax = builder.call(declare(builder, "llvm.vector.reduce.fmax.v32f32", F32, [t]), [magnitude])
        positive = builder.fcmp_ordered(">", amax, ir.Constant(F32, 0.0))
        inverse = builder.select(positive, builder.fdiv(ir.Constant(F32, 127.0), amax), ir.Constant(F32, 0.0))
        scaled = builder.fmul(values, broadcast(builder, inverse, BLOCK))  # no fast flags: IEEE rounding
        rounded = builder.call(declare(builder, "llvm.rint.v32f32", t, [t]), [scaled])
        q = builder.fptosi(rounded, vec(I32, BLOCK))
        biased = builder.add(q, splat(I32, BLOCK, bias)) if bias else q
        store(
            builder, builder.trunc(biased, vec(I8, BLOCK)), xq, builder.add(at, builder.mul(b, const(BLOCK)))
        )
        d = builder.fdiv(amax, ir.Constant(F32, 127.0))
        store(builder, d, xd, builder.add(d_at, b), 4)
        store(builder, fmul(builder, horizontal_sum(builder, rounded, BLOCK), d), xs, builder.add(d_at, b), 4)
        if xq4 is not None:
            parts = [builder.shuffle_vector(q, q, indices(range(k, BLOCK, 4))) for k in range(4)]
            quads = builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))
            store(builder, quads, xq4, builder.mul(builder.add(d_at, b), const(BLOCK // 4)), 4)
        return []

    counted_loop(builder, builder.udiv(n_values, const(BLOCK)), [], block)


def quantize_row_intrinsic(bias: int, with_quads: bool):
    """A numba intrinsic quantize(row, xq, xd, xs, xq4, at, d_at): one vector of activations
    (float32 [n], contiguous) quantized into the arrays at element `at` (xq) and block `d_at` (the
    others); `bias` added to the stored values (128: unsigned bytes), xq4 written `with_quads`."""

    @intrinsic
    def quantize_row(typingctx, row, xq, xd, xs, xq4, at, d_at):
        arrays = (row, xq, xd, xs, xq4)
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
            return None

        def codegen(context, builder, sig, args):
            made = [context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:5], args[:5])]
            data = [builder.bitcast(a.data, t.as_pointer()) for a, t in zip(made, (F32, I8, F32, F32, I32))]
            n_values = builder.extract_value(made[0].shape, 0)
            quads = data[4] if with_quads else None
            _quantize_ir(builder, data[0], n_values, data[1], data[2], data[3], quads, args[5], args[6], bias)
            return context.get_dummy_value()

        return types.void(*arrays, types.int64, types.int64), codegen

    return quantize_row


_quantize_signed = quantize_row_intrinsic(0, True)


@njit(cache=True)
def quantize_activations(x):
    """x [n] float32 (n a multiple of 32, contiguous) -> (q int8 [n], d float32 [n/32], the sums of
    x as rounded per block (d x the sum of q) float32 [n/32], the sums of q per group of 4 int32
    [n/4]), x ~ q * d per block of 32. For numba kernels; `quantize` checks its input."""
    n_blocks = x.size // BLOCK
    q = np.empty(x.size, np.int8)
    d = np.empty(n_blocks, np.float32)
    sums = np.empty(n_blocks, np.float32)
    sums4 = np.empty(x.size // 4, np.int32)
    _quantize_signed(x, q, d, sums, sums4, 0, 0)
    return q, d, sums, sums4


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_activations` for a vector from Python, checked."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 or x.size % BLOCK:
        raise ValueError(f"activations of shape {x.shape}: need one vector of whole blocks of {BLOCK}")
    return quantize_activations(x)


# -- LLVM IR ---------------------------------------------------------------------------------


def _chunks(builder, v, size):
    """A vector cut into consecutive vectors of `size` elements."""
    n = v.type.count
    return [builder.shuffle_vector(v, v, indices(range(k, k + size))) for k in range(0, n, size)]


def _joined(builder, parts):
    """The inverse of `_chunks`."""
    while len(parts) > 1:
        parts = [
            builder.shuffle_vector(a, b, indices(range(2 * a.type.count)))
            for a, b in zip(parts[::2], parts[1::2])
        ]
    return parts[0]


def _dot4_avx2(builder, acc, a, b, signed):
    """<8 x i32> acc + sums of 4 of <32 x i8> a x b: vpmaddubsw (unsigned a x signed b, pairs
    to int16; no saturation for |a| <= 128 with |b| <= 127, or a <= 31), vpmaddwd by ones."""
    t8, t16 = vec(I8, 32), vec(ir.IntType(16), 16)
    if signed:  # |a| x (b with a's sign): the same products, a now unsigned
        sign = declare(builder, "llvm.x86.avx2.psign.b", t8, [t8, t8])
        a, b = builder.call(sign, [a, a]), builder.call(sign, [b, a])
    pairs = builder.call(declare(builder, "llvm.x86.avx2.pmadd.ub.sw", t16, [t8, t8]), [a, b])
    quads = builder.call(
        declare(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [t16, t16]),
        [pairs, splat(ir.IntType(16), 16, 1)],
    )
    return builder.add(acc, quads)


def _dot4_chunk(builder, isa, acc, a, b, signed):
    """One native register's worth of `_dot4`."""
    if isa == "avx2":
        return _dot4_avx2(builder, acc, a, b, signed)
    if isa == "avxvnni":  # declared with the <8 x i32> operands of LLVM <= 21; LLVM 22 upgrades them
        t = vec(I32, 8)
        return builder.call(
            declare(builder, "llvm.x86.avx512.vpdpbusd.256", t, [t, t, t]),
            [acc, builder.bitcast(a, t), builder.bitcast(b, t)],
        )
    t, t8 = vec(I32, 4), vec(I8, 16)  # ARM: usdot (unsigned x signed), sdot (signed x signed)
    name = "llvm.aarch64.neon.sdot.v4i32.v16i8" if isa == "dotprod" else "llvm.aarch64.neon.usdot.v4i32.v16i8"
    return builder.call(declare(builder, name, t, [t, t8, t8]), [acc, a, b])


_CHUNK_BYTES = {"avx2": 32, "avxvnni": 32, "dotprod": 16, "i8mm": 16}


def _dot4(builder, isa, acc, a, b, signed=False):
    """acc <16 x i32> + (<64 x i8> a, b -> lane i = sum_k a[4i+k] * b[4i+k]): a the weights,
    unsigned (or signed, for the paths in isa.SIGNED_WEIGHTS), b the signed activations."""
    assert not signed or isa in isas.SIGNED_WEIGHTS or isa == "portable"
    if isa == "avx512vnni":  # declared with the <16 x i32> operands of LLVM <= 21; LLVM 22 upgrades them
        t = vec(I32, 16)
        return builder.call(
            declare(builder, "llvm.x86.avx512.vpdpbusd.512", t, [t, t, t]),
            [acc, builder.bitcast(a, t), builder.bitcast(b, t)],
        )
    if isa in _CHUNK_BYTES:
        size = _CHUNK_BYTES[isa]
        parts = zip(_chunks(builder, acc, size // 4), _chunks(builder, a, size), _chunks(builder, b, size))
        return _joined(builder, [_dot4_chunk(builder, isa, *part, signed) for part in parts])
    widen = builder.sext if signed else builder.zext
    products = builder.mul(widen(a, vec(I32, 64)), builder.sext(b, vec(I32, 64)))
    part = [builder.shuffle_vector(products, products, indices(range(k, 64, 4))) for k in range(4)]
    return builder.add(acc, builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3])))


def _pad(builder, v, n):
    """The n-element vector v followed by n zeros."""
    return builder.shuffle_vector(v, ir.Constant(v.type, None), indices(range(2 * n)))


def _spread(builder, v, n, lanes):
    """<n x float> -> <n * lanes x float>, each value repeated over `lanes` lanes."""
    return builder.shuffle_vector(v, v, indices([i for i in range(n) for _ in range(lanes)]))


def _row_dot(builder, isa, n_values, xq, xq4, bias, signed, step, tail=True, offsets=None):
    """The dot product of one weight row with the quantized activations (data pointers `xq`,
    `xq4`), 64 values a step (and with `tail`, one step of 32 when n_values is an odd multiple of
    32). `step(builder, start, width)` gives the weights start..start+width as bytes (the stored
    values + bias, unsigned; or with `signed` the values themselves) and a float scale for each
    group of 4 (weight scale x activation scale); a bias comes back out with the activations'
    sums of 4 (`xq4`), subtracted in the integer lanes. `offsets` (pointers to the row's float
    offsets per 32 values and the rounded activations' sums per 32) adds their products,
    in the same loop."""

    def accumulate(builder, acc, start, width):
        values, scales = step(builder, start, width)
        x = load(builder, xq, start, vec(I8, width))
        init = ir.Constant(vec(I32, width // 4), None)
        if bias:
            sums = load(builder, xq4, builder.udiv(start, const(4)), vec(I32, width // 4))
            init = builder.mul(sums, splat(I32, width // 4, -bias))
        if width == 32:
            values, x, init, scales = (
                _pad(builder, v, n) for v, n in ((values, 32), (x, 32), (init, 8), (scales, 8))
            )
        lanes = builder.sitofp(_dot4(builder, isa, init, values, x, signed), vec(F32, 16))
        return builder.fadd(acc, fmul(builder, lanes, scales), flags=("fast",))

    def offset_terms(builder, acc, start):
        block = builder.udiv(start, const(BLOCK))
        terms = fmul(
            builder,
            load(builder, offsets[0], block, vec(F32, 2), 4),
            load(builder, offsets[1], block, vec(F32, 2), 4),
        )
        return builder.fadd(acc, terms, flags=("fast",))

    def full_step(builder, i, accs):
        start = builder.mul(i, const(64))
        updated = [accumulate(builder, accs[0], start, 64)]
        return updated + [offset_terms(builder, accs[1], start)] if offsets else updated

    initial = [ir.Constant(vec(F32, 16), None)] + ([ir.Constant(vec(F32, 2), None)] if offsets else [])
    accs = counted_loop(builder, builder.udiv(n_values, const(64)), initial, full_step)
    extra = horizontal_sum(builder, accs[1], 2) if offsets else None
    acc = accs[0]
    if tail:
        tail_start = builder.mul(builder.udiv(n_values, const(64)), const(64))
        before = builder.block
        with builder.if_then(builder.icmp_unsigned("<", tail_start, n_values)):
            with_tail = accumulate(builder, acc, tail_start, 32)
            tail_end = builder.block
        total = builder.phi(acc.type)
        total.add_incoming(acc, before)
        total.add_incoming(with_tail, tail_end)
        acc = total
    result = horizontal_sum(builder, acc, 16)
    return builder.fadd(result, extra, flags=("fast",)) if offsets else result


def _lane_scales(builder, weight_scales, xd, start, width, sub):
    """Scales of the lanes of a step: weight scales <width/sub x float> (one per sub values) times
    the activation scales (pointer `xd`) of their blocks of 32, each over the sub/4 lanes of its values."""
    n_weight, n_x = width // sub, width // BLOCK
    x_scales = load(builder, xd, builder.udiv(start, const(BLOCK)), vec(F32, n_x), 4)
    x_scales = _spread(builder, x_scales, n_x, n_weight // n_x)
    return _spread(builder, fmul(builder, weight_scales, x_scales), n_weight, sub // 4)


def _nibble_values(builder, packed, n):
    """<n x i8> bytes -> <2n x i8>: their low nibbles, then their high ones."""
    low = builder.and_(packed, splat(I8, n, 15))
    high = builder.lshr(packed, splat(I8, n, 4))
    return builder.shuffle_vector(low, high, indices(range(2 * n)))


# Each layout's dot product as IR over data pointers: (builder, isa, row, scale, offset, xq, xd,
# x_sums, xq4, n_values) -> float; `row` the weights' bytes, `scale` and `offset` their float
# scales and offsets (the block layouts keep theirs in the row and have no offsets), the
# activations as `quantize_activations` gives them, n_values the row's length.


def _nibble_dot_ir(builder, isa, row, scale, offset, xq, xd, x_sums, xq4, n_values):
    def step(builder, start, width):  # run start / 64: 32 bytes, low nibbles then high ones
        nibbles = load(builder, row, builder.udiv(start, const(2)), vec(I8, 32))
        weight_scales = load(builder, scale, builder.udiv(start, const(BLOCK)), vec(F32, 2), 4)
        return _nibble_values(builder, nibbles, 32), _lane_scales(
            builder, weight_scales, xd, start, 64, BLOCK
        )

    return _row_dot(builder, isa, n_values, xq, None, 0, False, step, tail=False, offsets=(offset, x_sums))


def _int8_dot_ir(sub: int):
    """int8 rows (kernels.int8), a float scale per `sub` values."""

    def build(builder, isa, row, scale, offset, xq, xd, x_sums, xq4, n_values):
        signed = _signed(isa, 128)

        def step(builder, start, width):  # int8 values (+ 128 as unsigned bytes), a scale per sub
            values = load(builder, row, start, vec(I8, width))
            if not signed:
                values = builder.xor(values, splat(I8, width, 0x80))
            weight_scales = load(builder, scale, builder.udiv(start, const(sub)), vec(F32, width // sub), 4)
            return values, _lane_scales(builder, weight_scales, xd, start, width, sub)

        return _row_dot(builder, isa, n_values, xq, xq4, 0 if signed else 128, signed, step)

    return build


def _signed(isa: str, bias: int) -> bool:
    """Whether a layout whose values + bias are unsigned bytes goes to this path signed instead:
    where the path cannot take unsigned bytes over 127 (kernels.isa.SIGNED_WEIGHTS)."""
    return bias > 127 and isa in isas.SIGNED_WEIGHTS


def _blocks_dot_ir(block_bytes: int, bias: int, block_values):
    """A row of GGUF blocks of 32 values with an f16 scale first (Q5_0, Q8_0): `block_values(
    builder, data, offset, signed)` gives the 32 values of the block at byte `offset` as bytes,
    + bias as unsigned ones (or the values themselves with `signed`)."""

    def build(builder, isa, row, scale, offset, xq, xd, x_sums, xq4, n_values):
        signed = _signed(isa, bias)

        def step(builder, start, width):
            values, scales = [], ir.Constant(vec(F32, width // BLOCK), None)
            for k in range(width // BLOCK):
                offset = builder.mul(
                    builder.add(builder.udiv(start, const(BLOCK)), const(k)), const(block_bytes)
                )
                values.append(block_values(builder, row, offset, signed))
                d = builder.fpext(load(builder, row, offset, ir.HalfType()), F32)
                scales = builder.insert_element(scales, d, ir.Constant(I32, k))
            if width == 64:
                values = [builder.shuffle_vector(values[0], values[1], indices(range(64)))]
            return values[0], _lane_scales(builder, scales, xd, start, width, BLOCK)

        return _row_dot(builder, isa, n_values, xq, xq4, 0 if signed else bias, signed, step)

    return build


def _q5_0_values(builder, data, offset, signed):
    """The 32 values of a Q5_0 block + 16 (0..31): nibbles 0..15 low, 16..31 high, fifth bits
    from a 32-bit mask."""
    nibbles = load(builder, data, builder.add(offset, const(6)), vec(I8, 16))
    fifth = builder.bitcast(load(builder, data, builder.add(offset, const(2)), I32), vec(ir.IntType(1), 32))
    fifth = builder.shl(builder.zext(fifth, vec(I8, 32)), splat(I8, 32, 4))
    return builder.or_(_nibble_values(builder, nibbles, 16), fifth)


def _q8_0_values(builder, data, offset, signed):
    """The 32 int8 values of a Q8_0 block: + 128 as unsigned bytes (the sign bit flipped), or
    as they are with `signed`."""
    values = load(builder, data, builder.add(offset, const(2)), vec(I8, 32))
    return values if signed else builder.xor(values, splat(I8, 32, 0x80))


# name -> (IR builder, bytes of the row per `per` values)
LAYOUTS = {
    "nibble_dot": (_nibble_dot_ir, 1, 2),
    "q5_0_dot": (_blocks_dot_ir(Q5_0_BYTES, 16, _q5_0_values), Q5_0_BYTES, BLOCK),
    "q8_0_dot": (_blocks_dot_ir(Q8_0_BYTES, 128, _q8_0_values), Q8_0_BYTES, BLOCK),
    "int8_dot16": (_int8_dot_ir(16), 1, 1),
    "int8_dot32": (_int8_dot_ir(32), 1, 1),
}


def assembly(isa: str, triple: str, cpu: str = "", features: str = "") -> str:
    """The five dot products of a path compiled for a target as assembly (to check paths this
    machine cannot run: `assembly("i8mm", "aarch64-unknown-linux-gnu", features="+neon,+i8mm")`)."""
    module = ir.Module(name=f"intdot_{isa}")
    pointers = [t.as_pointer() for t in (I8, F32, F32, I8, F32, F32, I32)]
    for name, (build, _, _) in LAYOUTS.items():
        function = ir.Function(module, ir.FunctionType(F32, [*pointers, I64]), name=name)
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        builder.ret(build(builder, isa, *function.args))
    return emit_assembly(module, triple, cpu, features)


# -- numba intrinsics ---------------------------------------------------------------------------


def _checked(arrays, dtypes) -> bool:
    """Whether the arguments are contiguous 1-D arrays of these element types."""
    return all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == t
        for a, t in zip(arrays, dtypes)
    )


_FIELDS = ("row", "scale", "offset", "xq", "xd", "x_sums", "xq4")


def _codegen(isa, name, fields):
    """A numba codegen calling layout `name`'s IR on the arrays given as `fields` (a subset of
    `_FIELDS`, in that order)."""
    build, row_bytes, per = LAYOUTS[name]

    def codegen(context, builder, signature, args):
        arrays = dict(
            zip(fields, (context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args)))
        )
        pointers = [arrays[f].data if f in arrays else None for f in _FIELDS]
        n = builder.mul(builder.extract_value(arrays["row"].shape, 0), const(per))
        return build(builder, isa, *pointers, builder.udiv(n, const(row_bytes)))

    return codegen


def _intrinsics(isa: str):
    @intrinsic
    def nibble_dot(typingctx, row, scale, offset, xq, xd, x_sums):
        """sum over runs g of a nibble row (kernels.int4 layout, uint8 [cols/2]) of
        scale[2g] xd[2g] (low nibbles . xq[64g:64g+32]) + scale[2g+1] xd[2g+1] (high . xq[64g+32:64g+64])
        + offset[2g] x_sums[2g] + offset[2g+1] x_sums[2g+1]."""
        arrays = (row, scale, offset, xq, xd, x_sums)
        if not _checked(
            arrays, (types.uint8, types.float32, types.float32, types.int8, types.float32, types.float32)
        ):
            return None
        return types.float32(*arrays), _codegen(
            isa, "nibble_dot", ("row", "scale", "offset", "xq", "xd", "x_sums")
        )

    def blocks_dot(name):
        @intrinsic
        def dot(typingctx, row, xq, xd, xq4):
            """A row of blocks (bytes, whole blocks) . the quantized activations:
            sum over blocks b of d[b] xd[b] (values[b] . xq[32b:32b+32])."""
            if not _checked((row, xq, xd, xq4), (types.uint8, types.int8, types.float32, types.int32)):
                return None
            return types.float32(row, xq, xd, xq4), _codegen(isa, name, ("row", "xq", "xd", "xq4"))

        return dot

    def int8_dot(name):
        @intrinsic
        def dot(typingctx, row, scale, xq, xd, xq4):
            """An int8 row (kernels.int8) . the quantized activations, a scale per 16 or 32
            values: sum over sub-blocks s of scale[s] xd[block of s] (q[s] . xq[s])."""
            if not _checked(
                (row, scale, xq, xd, xq4), (types.int8, types.float32, types.int8, types.float32, types.int32)
            ):
                return None
            return types.float32(row, scale, xq, xd, xq4), _codegen(
                isa, name, ("row", "scale", "xq", "xd", "xq4")
            )

        return dot

    return (
        nibble_dot,
        blocks_dot("q5_0_dot"),
        blocks_dot("q8_0_dot"),
        int8_dot("int8_dot16"),
        int8_dot("int8_dot32"),
    )


nibble_dot, q5_0_dot, q8_0_dot, int8_dot16, int8_dot32 = _intrinsics(ISA)
