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

numba types arithmetic on 8-bit integers as 64-bit (its typing rules), so this loop is not
written in numba's Python but built as LLVM IR (llvmlite) inside a numba intrinsic; the
kernels around it (threads, prefetch, offsets) stay numba. Where the CPU has no AVX-512 VNNI
the same lanes are computed with portable vector IR (widen, multiply, add groups of 4), which
LLVM lowers for any target.

What changes numerically: the weights' scaled parts meet the activations as rounded to int8,
an error of at most d / 2 a value (0.4% of the block's largest). Offsets (Q4_1, Q4_K) meet
the exact float sums of the activations. Prefill multiplies float32 with BLAS and is exact.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

BLOCK = 32  # activation values per scale
Q5_0_BYTES = 22  # a Q5_0 block: f16 scale, 32 fifth bits, 16 bytes of nibbles

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _has_vnni512() -> bool:
    """Whether numba compiles for this CPU and it has the 512-bit byte dot product."""
    if config.CPU_NAME not in (None, "host"):
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512vnni", "avx512bw", "avx512f"))


VNNI512 = _has_vnni512()


@njit(fastmath=True, error_model="numpy", cache=True)
def quantize_activations(x):
    """x [n] float32 (n a multiple of 32) -> (q int8 [n], d float32 [n/32], the exact sums of x
    and the sums of q per block, float32 [n/32]), x ~ q * d per block of 32. For numba kernels;
    `quantize` checks its input."""
    n_blocks = x.size // BLOCK
    q = np.empty(x.size, np.int8)
    d = np.empty(n_blocks, np.float32)
    sums = np.empty(n_blocks, np.float32)
    q_sums = np.empty(n_blocks, np.float32)
    for b in range(n_blocks):
        amax = np.float32(0.0)
        total = np.float32(0.0)
        for j in range(BLOCK):
            v = x[b * BLOCK + j]
            amax = max(amax, abs(v))
            total += v
        inverse = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        q_total = np.float32(0.0)
        for j in range(BLOCK):
            v = np.rint(x[b * BLOCK + j] * inverse)
            q[b * BLOCK + j] = np.int8(v)
            q_total += v
        d[b] = amax / np.float32(127.0)
        sums[b] = total
        q_sums[b] = q_total
    return q, d, sums, q_sums


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`quantize_activations` for a vector from Python, checked."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 or x.size % BLOCK:
        raise ValueError(f"activations of shape {x.shape}: need one vector of whole blocks of {BLOCK}")
    return quantize_activations(x)


# -- LLVM IR ---------------------------------------------------------------------------------


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _indices(values):
    return ir.Constant(_vec(_I32, len(values)), list(values))


def _load(builder, data, index, typ, align=1):
    """Load a `typ` at element `index` of a numba array's data pointer."""
    return builder.load(builder.bitcast(builder.gep(data, [index]), typ.as_pointer()), align=align)


def _dot4(builder, a, b, vnni: bool):
    """<64 x i8> a (unsigned), b (signed) -> <16 x i32>: lane i = sum_k a[4i+k] * b[4i+k]."""
    if vnni:  # declared with the <16 x i32> operands of LLVM <= 21; LLVM 22 upgrades them
        t = _vec(_I32, 16)
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", (), ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, [ir.Constant(t, None), builder.bitcast(a, t), builder.bitcast(b, t)])
    products = builder.mul(builder.zext(a, _vec(_I32, 64)), builder.sext(b, _vec(_I32, 64)))
    part = [builder.shuffle_vector(products, products, _indices(range(k, 64, 4))) for k in range(4)]
    return builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3]))


def _horizontal_sum(builder, v, n):
    while n > 1:
        n //= 2
        low = builder.shuffle_vector(v, v, _indices(range(n)))
        high = builder.shuffle_vector(v, v, _indices(range(n, 2 * n)))
        v = builder.fadd(low, high, flags=("fast",))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _counted_loop(builder, count, initial, body):
    """for i in range(count): values = body(builder, i, values); returns the final values
    (LLVM values, one phi each)."""
    entry = builder.block
    head, block, done = (builder.function.append_basic_block(f"intdot.{n}") for n in ("head", "body", "done"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    phis = []
    for value in initial:
        phis.append(builder.phi(value.type))
        phis[-1].add_incoming(value, entry)
    builder.cbranch(builder.icmp_unsigned("<", i, count), block, done)
    builder.position_at_end(block)
    updated = body(builder, i, phis)
    i.add_incoming(builder.add(i, ir.Constant(_I64, 1)), builder.block)
    for phi, value in zip(phis, updated):
        phi.add_incoming(value, builder.block)
    builder.branch(head)
    builder.position_at_end(done)
    return phis


def _scaled_lanes(builder, acc, values, x, scales, vnni):
    """acc + (values . x in 16 lanes, 8 a block) * (scales [2] spread over each block's lanes)."""
    lanes = builder.sitofp(_dot4(builder, values, x, vnni), _vec(_F32, 16))
    spread = builder.shuffle_vector(scales, scales, _indices([0] * 8 + [1] * 8))
    return builder.fadd(acc, builder.fmul(lanes, spread, flags=("fast",)), flags=("fast",))


def _fmul(builder, a, b):
    return builder.fmul(a, b, flags=("fast",))


def _arrays(context, builder, signature, args):
    return [context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args)]


def _const(value):
    return ir.Constant(_I64, value)


def _nibble_dot_codegen(vnni: bool):
    def codegen(context, builder, signature, args):
        row, scale, xq, xd = _arrays(context, builder, signature, args)

        def run(builder, g, acc):  # run g: 32 bytes, values 64g + j (low nibbles) and 64g + 32 + j (high)
            (acc,) = acc
            nibbles = _load(builder, row.data, builder.mul(g, _const(32)), _vec(_I8, 32))
            low = builder.and_(nibbles, _splat(_I8, 32, 15))
            high = builder.lshr(nibbles, _splat(_I8, 32, 4))
            values = builder.shuffle_vector(low, high, _indices(range(64)))
            x = _load(builder, xq.data, builder.mul(g, _const(64)), _vec(_I8, 64))
            pair = builder.mul(g, _const(2))
            scales = _fmul(builder, _load(builder, scale.data, pair, _vec(_F32, 2), 4), _load(builder, xd.data, pair, _vec(_F32, 2), 4))
            return [_scaled_lanes(builder, acc, values, x, scales, vnni)]

        n_runs = builder.udiv(builder.extract_value(row.shape, 0), _const(32))
        (acc,) = _counted_loop(builder, n_runs, [ir.Constant(_vec(_F32, 16), None)], run)
        return _horizontal_sum(builder, acc, 16)

    return codegen


def _q5_0_dot_codegen(vnni: bool):
    def codegen(context, builder, signature, args):
        row, xq, xd, xq_sums = _arrays(context, builder, signature, args)
        half = ir.HalfType()

        def block_values(builder, offset):  # the 32 values of the block at byte `offset`, + 16 (0..31)
            nibbles = _load(builder, row.data, builder.add(offset, _const(6)), _vec(_I8, 16))
            low = builder.and_(nibbles, _splat(_I8, 16, 15))
            high = builder.lshr(nibbles, _splat(_I8, 16, 4))
            fifth = builder.bitcast(_load(builder, row.data, builder.add(offset, _const(2)), _I32), _vec(ir.IntType(1), 32))
            fifth = builder.shl(builder.zext(fifth, _vec(_I8, 32)), _splat(_I8, 32, 4))
            return builder.or_(builder.shuffle_vector(low, high, _indices(range(32))), fifth)

        def pair(builder, p, accs):  # blocks 2p and 2p + 1
            acc, correction = accs
            first = builder.mul(p, _const(2 * Q5_0_BYTES))
            second = builder.add(first, _const(Q5_0_BYTES))
            values = builder.shuffle_vector(block_values(builder, first), block_values(builder, second), _indices(range(64)))
            x = _load(builder, xq.data, builder.mul(p, _const(64)), _vec(_I8, 64))
            d = ir.Constant(_vec(_F32, 2), None)
            for k, offset in enumerate((first, second)):
                d = builder.insert_element(d, builder.fpext(_load(builder, row.data, offset, half), _F32), ir.Constant(_I32, k))
            blocks = builder.mul(p, _const(2))
            scales = _fmul(builder, d, _load(builder, xd.data, blocks, _vec(_F32, 2), 4))
            shift = _fmul(builder, scales, _load(builder, xq_sums.data, blocks, _vec(_F32, 2), 4))
            return [_scaled_lanes(builder, acc, values, x, scales, vnni), builder.fadd(correction, shift, flags=("fast",))]

        n_pairs = builder.udiv(builder.extract_value(row.shape, 0), _const(2 * Q5_0_BYTES))
        acc, correction = _counted_loop(builder, n_pairs, [ir.Constant(_vec(_F32, 16), None), ir.Constant(_vec(_F32, 2), None)], pair)
        sixteen = ir.Constant(_F32, 16.0)
        return builder.fsub(_horizontal_sum(builder, acc, 16), _fmul(builder, sixteen, _horizontal_sum(builder, correction, 2)),
                            flags=("fast",))

    return codegen


def _checked(arrays, dtypes) -> bool:
    """Whether the arguments are contiguous 1-D arrays of these element types."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == t for a, t in zip(arrays, dtypes))


def _nibble_dot_intrinsic(vnni: bool):
    @intrinsic
    def nibble_dot(typingctx, row, scale, xq, xd):
        """sum over runs g of a nibble row (kernels.int4 layout, uint8 [cols/2]) of
        scale[2g] xd[2g] (low nibbles . xq[64g:64g+32]) + scale[2g+1] xd[2g+1] (high . xq[64g+32:64g+64])."""
        if not _checked((row, scale, xq, xd), (types.uint8, types.float32, types.int8, types.float32)):
            return None
        return types.float32(row, scale, xq, xd), _nibble_dot_codegen(vnni)

    return nibble_dot


def _q5_0_dot_intrinsic(vnni: bool):
    @intrinsic
    def q5_0_dot(typingctx, row, xq, xd, xq_sums):
        """A row of Q5_0 blocks (uint8, an even number of 22-byte blocks) . the quantized
        activations: sum over blocks b of d[b] xd[b] (values[b] . xq[32b:32b+32]), values -16..15."""
        if not _checked((row, xq, xd, xq_sums), (types.uint8, types.int8, types.float32, types.float32)):
            return None
        return types.float32(row, xq, xd, xq_sums), _q5_0_dot_codegen(vnni)

    return q5_0_dot


nibble_dot = _nibble_dot_intrinsic(VNNI512)
q5_0_dot = _q5_0_dot_intrinsic(VNNI512)
# the portable fallbacks, also compiled where VNNI is (tests)
nibble_dot_portable = _nibble_dot_intrinsic(False)
q5_0_dot_portable = _q5_0_dot_intrinsic(False)
