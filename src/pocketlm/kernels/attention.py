"""Attention for a few new query tokens over the KV cache (decode), in numba and LLVM IR.

Prefill uses batched BLAS matmuls (backends/cpu.py). Decode does not: calling BLAS for each
token's tiny products woke OpenBLAS's threads, whose spinning then halved the speed of the
numba matvecs around them (measured: Gemma 3 270M decode 6 tok/s with BLAS attention).

Decode attention reads the whole cache once per token (SmolLM2 at 620 tokens: 29 MB of float32
over its 30 layers, as much as a fifth of its weights). The keys are split into chunks, one
thread a chunk, each keeping per head its own softmax maximum and sum, merged at the end (as
flash-decoding does). Within a chunk the products are two IR loops (`key_scores`,
`add_weighted_values`) whose sums stay in vector registers: the scores of 8 keys at a time
(8 accumulators over the head dimension, then one transposing horizontal sum), and the
probability-weighted values 32 dimensions at a time over a block of keys. Each loop serves all
the query heads of a kv head's group in turn while the keys they share are in L1. Written as
plain numba loops, one dot product per (key, head), they took 3-4x as long: a horizontal sum
for every product, the query reloaded for every key, the accumulator stored for every key.

The cache may hold float16 (as uint16 bits: numba has no float16 on the CPU); the loops widen
8 values at a time (`vcvtph2ps` with F16C). The head dimensions must be multiples of 8
(`fits`); other shapes take the BLAS path.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .ir import (
    F32,
    FAST,
    I16,
    I32,
    I64,
    const,
    counted_loop,
    emit_assembly,
    fadd,
    indices,
    load,
    prefetch_line,
    store,
    vec,
)
from .memory import PREFETCH, prefetch
from .vecmath import exp_nonpositive, tanh

WORK_ITEMS = 16  # (token, chunk of keys) items to spread over the threads, at least
MIN_CHUNK = 32  # keys
LANES = 8  # floats a vector (AVX2; AVX-512 and NEON machines run the same IR, split or joined)
VALUE_RUN = 4  # vectors of value dimensions summed at once
AHEAD = 4  # keys prefetched ahead by the float32 kernel
KEY_BLOCK = 16  # keys a run of value dimensions goes over before the next head takes them


@njit(inline="always")
def _visible(query_pos, key_pos, window):
    """Whether a query sees a key: not later, within the window (0: none); -1 is an empty slot.
    (Bitwise, without branches: the loops around it vectorise.)"""
    delta = query_pos - key_pos
    return (key_pos >= 0) & (delta >= 0) & ((window <= 0) | (delta < window))


def fits(head_dim: int, value_dim: int) -> bool:
    """Whether these kernels take heads this wide."""
    return head_dim % LANES == 0 and value_dim % LANES == 0


def chunks_for(T: int, S: int) -> int:
    """How many chunks to split the keys into."""
    return max(1, min(-(-WORK_ITEMS // T), S // MIN_CHUNK))


@njit(inline="always")
def chunk_size(S, n_chunks):
    """Keys a chunk: a multiple of 8, so that only the last chunk has keys taken one by one."""
    return -(-S // (n_chunks * LANES)) * LANES


# -- LLVM IR ---------------------------------------------------------------------------------


def _floats(builder, data, index, half):
    """<8 x float> from element `index` of float32 data, or of float16 data (as i16)."""
    if not half:
        return load(builder, data, index, vec(F32, LANES), 4)
    bits = load(builder, data, index, vec(I16, LANES), 2)
    return builder.fpext(builder.bitcast(bits, vec(ir.HalfType(), LANES)), vec(F32, LANES))


def _fma(builder, a, b, acc):
    return builder.fadd(acc, builder.fmul(a, b, flags=FAST), flags=FAST)


def _pair_sums(builder, x, y):
    """vhaddps: [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]."""
    even = builder.shuffle_vector(x, y, indices([0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(x, y, indices([1, 3, 9, 11, 5, 7, 13, 15]))
    return fadd(builder, even, odd)


def _sums_of_8(builder, a):
    """Eight <8 x float> -> one <8 x float> of their lane sums, in order."""
    low = _pair_sums(builder, _pair_sums(builder, a[0], a[1]), _pair_sums(builder, a[2], a[3]))
    high = _pair_sums(builder, _pair_sums(builder, a[4], a[5]), _pair_sums(builder, a[6], a[7]))
    # low: sums 0-3 of the low halves of a0..a3, then of their high halves; high: the same for a4..a7
    first = builder.shuffle_vector(low, high, indices([0, 1, 2, 3, 8, 9, 10, 11]))
    second = builder.shuffle_vector(low, high, indices([4, 5, 6, 7, 12, 13, 14, 15]))
    return fadd(builder, first, second)


def _prefetch(builder, data, start, count, half):
    """Ask for elements start..start + count of `data` (one request per 64-byte line); they are
    the next block's rows, read while this block's are multiplied (without it the rows of the
    kv heads, read apart, came from DRAM at two thirds of the speed of reading them in order)."""
    elements = 32 if half else 16  # per line
    address = builder.bitcast(builder.gep(data, [start]), ir.IntType(8).as_pointer())

    def line(builder, i, _):
        prefetch_line(builder, builder.gep(address, [builder.mul(i, const(64))]))
        return []

    counted_loop(builder, builder.udiv(count, const(elements)), [], line)


def _block(builder, half, data, start, n_elements, scratch):
    """A block of rows (n_elements from start, contiguous) copied into float32 `scratch` in one
    pass in order, widened from float16 where the cache holds it; returns (scratch, 0), where the
    heads then read it. Reading each kv head's part of the rows apart from the cache ran at half
    the speed of reading them in order, and widening per head (one `vcvtph2ps` per 8 values)
    bounded the loops."""

    def step(builder, i, _):
        d = builder.mul(i, const(LANES))
        store(builder, _floats(builder, data, builder.add(start, d), half), scratch, d, 4)
        return []

    counted_loop(builder, builder.udiv(n_elements, const(LANES)), [], step)
    return scratch, const(0)


def _key_scores_ir(
    builder, half, q, q_off, k, k_off, k_stride, n_blocks, n_kv, group, D, out, out_off, out_step, scratch
):
    """For h < n_kv group, b < n_blocks, j < 8: out[out_off + h out_step + 8b + j] =
    q[q_off + h D : + D] . k[k_off + (8b + j) k_stride + (h // group) D : + D]."""

    def block(builder, b, _):
        first = builder.add(k_off, builder.mul(builder.mul(b, const(LANES)), k_stride))
        with builder.if_then(builder.icmp_unsigned("<", builder.add(b, const(1)), n_blocks)):
            size = builder.mul(const(LANES), k_stride)
            _prefetch(builder, k, builder.add(first, size), size, half)

        data, start = _block(builder, half, k, first, builder.mul(const(LANES), k_stride), scratch)

        def kv_head(builder, kv, _):
            keys = builder.add(start, builder.mul(kv, D))
            rows = [builder.add(keys, builder.mul(const(j), k_stride)) for j in range(LANES)]

            def head(builder, g, _):
                h = builder.add(builder.mul(kv, group), g)
                q_row = builder.add(q_off, builder.mul(h, D))

                def step(builder, i, accs):
                    d = builder.mul(i, const(LANES))
                    qv = load(builder, q, builder.add(q_row, d), vec(F32, LANES), 4)
                    return [
                        _fma(builder, qv, _floats(builder, data, builder.add(r, d), False), a)
                        for r, a in zip(rows, accs)
                    ]

                zero = ir.Constant(vec(F32, LANES), None)
                accs = counted_loop(builder, builder.udiv(D, const(LANES)), [zero] * LANES, step)
                at = builder.add(builder.add(out_off, builder.mul(h, out_step)), builder.mul(b, const(LANES)))
                store(builder, _sums_of_8(builder, accs), out, at, 4)
                return []

            counted_loop(builder, group, [], head)
            return []

        counted_loop(builder, n_kv, [], kv_head)
        return []

    counted_loop(builder, n_blocks, [], block)


def _add_weighted_values_ir(
    builder, half, p, p_off, p_step, v, v_off, v_stride, n, n_kv, group, D, out, out_off, out_step, scratch
):
    """For h < n_kv group, d < D: out[out_off + h out_step + d] += sum over j < n of
    p[p_off + h p_step + j] v[v_off + j v_stride + (h // group) D + d]; D a multiple of 8."""
    n_blocks = builder.udiv(builder.add(n, const(KEY_BLOCK - 1)), const(KEY_BLOCK))

    def block(builder, b, _):
        first = builder.mul(b, const(KEY_BLOCK))
        rest = builder.sub(n, first)
        count = builder.select(builder.icmp_unsigned("<", rest, const(KEY_BLOCK)), rest, const(KEY_BLOCK))
        block_start = builder.add(v_off, builder.mul(first, v_stride))
        with builder.if_then(builder.icmp_unsigned("<", builder.add(b, const(1)), n_blocks)):
            after = builder.sub(rest, const(KEY_BLOCK))  # keys after this block: > 0 here
            rows = builder.select(
                builder.icmp_unsigned("<", after, const(KEY_BLOCK)), after, const(KEY_BLOCK)
            )
            next_start = builder.add(block_start, builder.mul(const(KEY_BLOCK), v_stride))
            _prefetch(builder, v, next_start, builder.mul(rows, v_stride), half)

        data, start = _block(builder, half, v, block_start, builder.mul(count, v_stride), scratch)

        def kv_head(builder, kv, _):
            values = builder.add(start, builder.mul(kv, D))

            def run(width, offset):
                """Value dimensions offset, offset + 8, ... (width vectors) of the group's heads."""

                def head(builder, g, _):
                    h = builder.add(builder.mul(kv, group), g)
                    at = builder.add(builder.add(out_off, builder.mul(h, out_step)), offset)
                    sums = [
                        load(builder, out, builder.add(at, const(LANES * m)), vec(F32, LANES), 4)
                        for m in range(width)
                    ]
                    weights = builder.add(builder.add(p_off, builder.mul(h, p_step)), first)
                    column = builder.add(values, offset)

                    def key(builder, j, accs):
                        weight = builder.load(builder.gep(p, [builder.add(weights, j)]))
                        spread = builder.insert_element(
                            ir.Constant(vec(F32, LANES), None), weight, ir.Constant(I32, 0)
                        )
                        spread = builder.shuffle_vector(spread, spread, indices([0] * LANES))
                        row = builder.add(column, builder.mul(j, v_stride))
                        return [
                            _fma(
                                builder,
                                spread,
                                _floats(builder, data, builder.add(row, const(LANES * m)), False),
                                a,
                            )
                            for m, a in enumerate(accs)
                        ]

                    sums = counted_loop(builder, count, sums, key)
                    for m, total in enumerate(sums):
                        store(builder, total, out, builder.add(at, const(LANES * m)), 4)
                    return []

                counted_loop(builder, group, [], head)

            runs = builder.udiv(D, const(LANES * VALUE_RUN))

            def full_run(builder, r, _):
                run(VALUE_RUN, builder.mul(r, const(LANES * VALUE_RUN)))
                return []

            counted_loop(builder, runs, [], full_run)
            done = builder.mul(runs, const(LANES * VALUE_RUN))

            def last_vectors(builder, i, _):
                run(1, builder.add(done, builder.mul(i, const(LANES))))
                return []

            counted_loop(builder, builder.udiv(builder.sub(D, done), const(LANES)), [], last_vectors)
            return []

        counted_loop(builder, n_kv, [], kv_head)
        return []

    counted_loop(builder, n_blocks, [], block)


def assembly(half: bool, triple: str, cpu: str = "", features: str = "") -> str:
    """Both loops over a float16 (`half`) or float32 cache compiled for a target as assembly (to
    check the targets this machine cannot run: `assembly(True, "aarch64-unknown-linux-gnu")`)."""
    module = ir.Module(name="attention")
    cache = (I16 if half else F32).as_pointer()
    for name, build, kinds in (  # f: float32 data, c: the cache, i: an integer
        ("key_scores", _key_scores_ir, "ficiiiiiifiif"),
        ("add_weighted_values", _add_weighted_values_ir, "fiiciiiiiifiif"),
    ):
        arguments = [cache if k == "c" else F32.as_pointer() if k == "f" else I64 for k in kinds]
        function = ir.Function(module, ir.FunctionType(ir.VoidType(), arguments), name=name)
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        build(builder, half, *function.args)
        builder.ret_void()
    return emit_assembly(module, triple, cpu, features)


# -- numba intrinsics ---------------------------------------------------------------------------


def _codegen(build, arrays, cache):
    """A numba codegen calling `build(builder, half, *args)` with the arguments at positions
    `arrays` as data pointers and the others as i64; `half` when the array at `cache` holds
    float16 bits."""

    def codegen(context, builder, signature, args):
        values = [
            context.make_array(t)(context, builder, v).data
            if i in arrays
            else context.cast(builder, v, t, types.int64)
            for i, (t, v) in enumerate(zip(signature.args, args))
        ]
        build(builder, signature.args[cache].dtype == types.uint16, *values)
        return context.get_dummy_value()

    return codegen


def _typed(arrays, cache, ints) -> bool:
    """Flat float32 arrays, a flat float32 or uint16 cache array, integers."""
    return (
        all(
            isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == types.float32
            for a in arrays
        )
        and isinstance(cache, types.Array)
        and cache.ndim == 1
        and cache.layout == "C"
        and cache.dtype in (types.float32, types.uint16)
        and all(isinstance(i, types.Integer) for i in ints)
    )


@intrinsic
def key_scores(
    typingctx, q, q_off, k, k_off, k_stride, n_blocks, n_kv, group, D, out, out_off, out_step, scratch
):
    """Scores of 8 n_blocks keys for n_kv group query heads (`_key_scores_ir`); scratch
    float32 [KEY_BLOCK * k_stride]."""
    ints = (q_off, k_off, k_stride, n_blocks, n_kv, group, D, out_off, out_step)
    if not _typed((q, out, scratch), k, ints):
        return None
    signature = types.void(
        q, q_off, k, k_off, k_stride, n_blocks, n_kv, group, D, out, out_off, out_step, scratch
    )
    return signature, _codegen(_key_scores_ir, {0, 2, 9, 12}, 2)


@intrinsic
def add_weighted_values(
    typingctx, p, p_off, p_step, v, v_off, v_stride, n, n_kv, group, D, out, out_off, out_step, scratch
):
    """Probability-weighted sums of n value rows added to n_kv group heads' outputs
    (`_add_weighted_values_ir`); scratch float32 [KEY_BLOCK * v_stride]."""
    ints = (p_off, p_step, v_off, v_stride, n, n_kv, group, D, out_off, out_step)
    if not _typed((p, out, scratch), v, ints):
        return None
    signature = types.void(
        p, p_off, p_step, v, v_off, v_stride, n, n_kv, group, D, out, out_off, out_step, scratch
    )
    return signature, _codegen(_add_weighted_values_ir, {0, 3, 10, 13}, 3)


@intrinsic
def as_float(typingctx, x):
    """A cache element as float32: float32 as it is, uint16 as the float16 it holds."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, signature, args: args[0]
    if x == types.uint16:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), F32)

        return types.float32(x), codegen
    return None


# -- kernels --------------------------------------------------------------------------------


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _attend_chunks(
    q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, part_max, part_sum, part_out, scores
):
    """Each (token, chunk of keys) item, for every head: the scores over the chunk's keys, their
    maximum and sum of exponentials, and the exponential-weighted sum of values (not yet
    divided). scores [items, n_heads * chunk size] is scratch."""
    T, n_heads, D = q.shape
    S, n_kv, Dv = v.shape
    group = n_heads // n_kv
    size = chunk_size(S, n_chunks)
    qf, kf, vf = q.reshape(-1), k.reshape(-1), v.reshape(-1)
    for item in prange(T * n_chunks):
        t, c = item // n_chunks, item % n_chunks
        first, end = c * size, min(S, (c + 1) * size)
        n = max(end - first, 0)
        full = n // LANES * LANES
        rows = scores[item]
        q_row = t * n_heads * D
        scratch = np.empty(KEY_BLOCK * n_kv * max(D, Dv), np.float32)
        key_scores(
            qf, q_row, kf, first * n_kv * D, n_kv * D, full // LANES, n_kv, group, D, rows, 0, size, scratch
        )
        for h in range(n_heads):  # the last keys, one by one
            for i in range(full, n):
                acc = np.float32(0.0)
                k_row = ((first + i) * n_kv + h // group) * D
                for d in range(D):
                    acc += qf[np.uint64(q_row + h * D + d)] * as_float(kf[np.uint64(k_row + d)])
                rows[h * size + i] = acc
        query_pos = q_pos[t]
        for h in range(n_heads):
            row = rows[h * size : h * size + n]
            if softcap > 0:
                for i in range(n):
                    row[i] = tanh(row[i] * scale / softcap) * softcap
            else:
                for i in range(n):
                    row[i] *= scale
            slope = alibi[h] if alibi.shape[0] > 0 else np.float32(0.0)
            best = np.float32(-np.inf)
            for i in range(n):  # ALiBi and the mask: no key later, none a window or more back, no empty slot
                key_pos = k_pos[first + i]
                x = row[i] + slope * np.float32(key_pos)
                x = x if _visible(query_pos, key_pos, window) else np.float32(-np.inf)
                row[i] = x
                best = max(best, x)
            part_max[item, h] = best
            total = np.float32(0.0)
            if best != -np.inf:
                for i in range(n):
                    e = exp_nonpositive(row[i] - best)  # 0 for masked keys (-inf)
                    row[i] = e
                    total += e
            else:  # nothing is visible in this chunk
                row[:] = 0.0
            part_sum[item, h] = total
        out = part_out[item].reshape(-1)
        out[:] = 0.0
        add_weighted_values(
            rows, 0, size, vf, first * n_kv * Dv, n_kv * Dv, n, n_kv, group, Dv, out, 0, Dv, scratch
        )


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _attend_rows(
    q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, ahead, part_max, part_sum, part_out
):
    """The float32 cache's kernel, one dot product per (key, head): each (token, chunk of keys)
    item, for every head, the scores over the chunk's keys, their maximum and sum of exponentials,
    and the exponential-weighted sum of values (not yet divided). An item reads its keys' rows of
    the cache whole, all kv heads, front to back, prefetching `ahead` keys ahead (0: none;
    kernels.memory.PREFETCH).

    Rows are read through flat views with unsigned offsets (see kernels.memory): with 2-D
    views made in the loop LLVM vectorised across the group instead of along the rows."""
    T, n_heads, D = q.shape
    S, n_kv, Dv = v.shape
    group = n_heads // n_kv
    size = -(-S // n_chunks)
    qf, kf, vf = q.reshape(-1), k.reshape(-1), v.reshape(-1)
    for item in prange(T * n_chunks):
        t, c = item // n_chunks, item % n_chunks
        first, end = c * size, min(S, (c + 1) * size)
        n = max(end - first, 0)
        scores = np.empty((n_heads, n), np.float32)
        best = np.full(n_heads, -np.inf, np.float32)
        for i in range(n):
            s = first + i
            if ahead > 0 and s + ahead < end:
                for d in range(0, n_kv * D, 16):
                    prefetch(kf, (s + ahead) * n_kv * D + d)
                for d in range(0, n_kv * Dv, 16):
                    prefetch(vf, (s + ahead) * n_kv * Dv + d)
            visible = _visible(q_pos[t], k_pos[s], window)
            for h in range(n_heads):
                q_base, k_base = (t * n_heads + h) * D, (s * n_kv + h // group) * D
                acc = np.float32(0.0)
                for d in range(D):
                    acc += qf[np.uint64(q_base + d)] * kf[np.uint64(k_base + d)]
                acc *= scale
                if softcap > 0:
                    acc = tanh(acc / softcap) * softcap
                if alibi.shape[0] > 0:
                    acc += alibi[h] * np.float32(k_pos[s])
                if not visible:
                    acc = -np.inf
                scores[h, i] = acc
                best[h] = max(best[h], acc)
        for h in range(n_heads):
            part_max[item, h] = best[h]
            total = np.float32(0.0)
            if best[h] != -np.inf:  # else nothing is visible in this chunk
                for i in range(n):
                    e = exp_nonpositive(scores[h, i] - best[h])  # 0 for masked keys (-inf)
                    scores[h, i] = e
                    total += e
            else:
                for i in range(n):
                    scores[h, i] = 0.0
            part_sum[item, h] = total
        out_flat = part_out[item].reshape(-1)
        out_flat[:] = 0.0
        for i in range(n):
            for h in range(n_heads):
                p = scores[h, i]
                if p != 0.0:
                    v_base = ((first + i) * n_kv + h // group) * Dv
                    for d in range(Dv):
                        out_flat[np.uint64(h * Dv + d)] += p * vf[np.uint64(v_base + d)]


@njit(cache=True, error_model="numpy")
def _merge(part_max, part_sum, part_out, n_chunks, out):
    T, n_heads, Dv = out.shape
    for t in range(T):
        for h in range(n_heads):
            items = t * n_chunks
            best = np.float32(-np.inf)
            for c in range(n_chunks):
                best = max(best, part_max[items + c, h])
            dst = out[t, h]
            dst[:] = 0.0
            total = np.float32(0.0)
            for c in range(n_chunks):
                if part_sum[items + c, h] > 0:
                    w = np.exp(part_max[items + c, h] - best)
                    total += w * part_sum[items + c, h]
                    src = part_out[items + c, h]
                    for d in range(Dv):
                        dst[d] += w * src[d]
            inv = (
                np.float32(1.0) / total if total > 0 else np.float32(0.0)
            )  # 0: scores all NaN (broken weights)
            for d in range(Dv):
                dst[d] *= inv


def attend(q, k, v, q_pos, k_pos, scale, window, softcap, alibi, out):
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] (float32, or float16 bits as uint16) ->
    out [T, Hq, Dv]; window/softcap 0 = off, alibi [Hq] or empty; D and Dv multiples of 8
    (`fits`). Every query must see at least one key (its own).

    A float16 cache goes through the IR loops; a float32 one through `_attend_rows`: the IR loops
    read it from DRAM no faster (measured on the EPYC) and their other summation order turned a
    greedy real-model reply into a repetition loop, so the float32 path keeps its numbers."""
    T, n_heads, _ = q.shape
    S, _, Dv = v.shape
    n_chunks = chunks_for(T, S)
    part_max = np.empty((T * n_chunks, n_heads), np.float32)
    part_sum = np.empty((T * n_chunks, n_heads), np.float32)
    part_out = np.empty((T * n_chunks, n_heads, Dv), np.float32)
    common = (q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks)
    if k.dtype == np.float32:
        _attend_rows(*common, AHEAD if PREFETCH else 0, part_max, part_sum, part_out)
    else:
        scores = np.empty((T * n_chunks, n_heads * chunk_size(S, n_chunks)), np.float32)
        _attend_chunks(*common, part_max, part_sum, part_out, scores)
    _merge(part_max, part_sum, part_out, n_chunks, out)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def softmax_scores(scores, q_pos, k_pos, scale, window, softcap, alibi):
    """Prompt attention's scores [Hkv, G, T, S] (q . k from BLAS) to probabilities, in place, in
    one pass per row: scale, soft-cap, ALiBi, the causal / window / empty-slot mask, softmax
    (numpy took seven passes over the array). alibi [Hkv * G] or empty."""
    n_kv, group, T, S = scores.shape
    for row in prange(n_kv * group * T):
        h, t = row // T, row % T
        dst = scores[h // group, h % group, t]
        best = np.float32(-np.inf)
        for s in range(S):
            x = dst[s] * scale
            if softcap > 0:
                x = tanh(x / softcap) * softcap
            if alibi.shape[0] > 0:
                x += alibi[h] * np.float32(k_pos[s])
            x = x if _visible(q_pos[t], k_pos[s], window) else np.float32(-np.inf)
            dst[s] = x
            best = max(best, x)
        total = np.float32(0.0)
        for s in range(S):
            e = exp_nonpositive(dst[s] - best)
            dst[s] = e
            total += e
        inv = np.float32(1.0) / total
        for s in range(S):
            dst[s] *= inv


@njit(parallel=True, cache=True)
def _widen(src, dst):
    for i in prange(src.shape[0]):
        row, out = src[i], dst[i]
        for j in range(row.size):
            out[np.uint64(j)] = as_float(row[np.uint64(j)])


def widen_f16(a: np.ndarray) -> np.ndarray:
    """A float16 array as float32, converted with the CPU's instruction (numpy's own conversion
    took 3 ns a value, a tenth of a prompt's attention)."""
    out = np.empty(a.shape, np.float32)
    rows = len(a) if a.ndim > 1 else 1
    _widen(np.ascontiguousarray(a).view(np.uint16).reshape(rows, -1), out.reshape(rows, -1))
    return out
