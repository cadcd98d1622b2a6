"""Attention for a few new query tokens over the KV cache (decode), in numba.

Prefill uses batched BLAS matmuls (backends/cpu.py). Decode does not: calling BLAS for each
token's tiny products woke OpenBLAS's threads, whose spinning then halved the speed of the
numba matvecs around them (measured: Gemma 3 270M decode 6 tok/s with BLAS attention).

Decode attention reads the whole cache once per token (SmolLM2 at 620 tokens: 29 MB over its
30 layers, as much as a fifth of its weights), so the kernel is written for memory: the
query heads that share a kv head are computed together, reading each key and value once;
the keys are split into chunks so that both threads have work even with one kv head, each
chunk keeping its own softmax maximum and sum, merged at the end (as flash-decoding does);
keys and values a few positions ahead are prefetched.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .memory import prefetch
from .vecmath import exp_nonpositive

WORK_ITEMS = 16  # (token, kv head, chunk of keys) items to spread over the threads, at least
MIN_CHUNK = 32  # keys
AHEAD = 4  # keys prefetched ahead


def chunks_for(T: int, n_kv: int, S: int) -> int:
    """How many chunks to split the keys into."""
    wanted = -(-WORK_ITEMS // (T * n_kv))
    return max(1, min(wanted, S // MIN_CHUNK))


@njit(parallel=True, fastmath=True, cache=True)
def _attend_chunks(q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, part_max, part_sum, part_out):
    """Each (token, kv head, chunk) item: the group's scores over its keys, their maximum and
    sum of exponentials, and the exponential-weighted sum of values (not yet divided).

    Rows are read through flat views with unsigned offsets (see kernels.memory): with 2-D
    views made in the loop LLVM vectorised across the group instead of along the rows."""
    T, n_heads, D = q.shape
    S, n_kv, Dv = v.shape
    group = n_heads // n_kv
    size = -(-S // n_chunks)
    qf, kf, vf = q.reshape(-1), k.reshape(-1), v.reshape(-1)
    for item in prange(T * n_kv * n_chunks):
        t = item // (n_kv * n_chunks)
        kh = (item // n_chunks) % n_kv
        c = item % n_chunks
        first, end = c * size, min(S, (c + 1) * size)
        n = max(end - first, 0)
        scores = np.empty((group, n), np.float32)
        best = np.full(group, -np.inf, np.float32)
        q_base = (t * n_heads + kh * group) * D
        for i in range(n):
            s = first + i
            k_base = (s * n_kv + kh) * D
            if s + AHEAD < end:
                for d in range(0, D, 16):
                    prefetch(kf, k_base + AHEAD * n_kv * D + d)
                for d in range(0, Dv, 16):
                    prefetch(vf, ((s + AHEAD) * n_kv + kh) * Dv + d)
            delta = q_pos[t] - k_pos[s]
            visible = k_pos[s] >= 0 and delta >= 0 and not (window > 0 and delta >= window)  # -1: empty slot
            for g in range(group):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += qf[np.uint64(q_base + g * D + d)] * kf[np.uint64(k_base + d)]
                acc *= scale
                if softcap > 0:
                    acc = np.float32(math.tanh(acc / softcap)) * softcap
                if alibi.shape[0] > 0:
                    acc += alibi[kh * group + g] * np.float32(k_pos[s])
                if not visible:
                    acc = -np.inf
                scores[g, i] = acc
                best[g] = max(best[g], acc)
        for g in range(group):
            part_max[item, g] = best[g]
            total = np.float32(0.0)
            if best[g] != -np.inf:  # else nothing is visible in this chunk
                for i in range(n):
                    e = exp_nonpositive(scores[g, i] - best[g])  # 0 for masked keys (-inf)
                    scores[g, i] = e
                    total += e
            else:
                for i in range(n):
                    scores[g, i] = 0.0
            part_sum[item, g] = total
        out_flat = part_out[item].reshape(-1)
        out_flat[:] = 0.0
        for i in range(n):
            v_base = ((first + i) * n_kv + kh) * Dv
            for g in range(group):
                p = scores[g, i]
                if p != 0.0:
                    for d in range(Dv):
                        out_flat[np.uint64(g * Dv + d)] += p * vf[np.uint64(v_base + d)]


@njit(cache=True)
def _merge(part_max, part_sum, part_out, n_chunks, out):
    T, n_heads, Dv = out.shape
    group = part_max.shape[1]
    n_kv = n_heads // group
    for t in range(T):
        for h in range(n_heads):
            kh, g = h // group, h % group
            items = (t * n_kv + kh) * n_chunks
            best = np.float32(-np.inf)
            for c in range(n_chunks):
                best = max(best, part_max[items + c, g])
            dst = out[t, h]
            dst[:] = 0.0
            total = np.float32(0.0)
            for c in range(n_chunks):
                if part_sum[items + c, g] > 0:
                    w = np.exp(part_max[items + c, g] - best)
                    total += w * part_sum[items + c, g]
                    src = part_out[items + c, g]
                    for d in range(Dv):
                        dst[d] += w * src[d]
            inv = np.float32(1.0) / total
            for d in range(Dv):
                dst[d] *= inv


def attend(q, k, v, q_pos, k_pos, scale, window, softcap, alibi, out):
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]; window/softcap 0 = off,
    alibi [Hq] or empty. Every query must see at least one key (its own)."""
    T, n_heads, _ = q.shape
    S, n_kv, Dv = v.shape
    n_chunks = chunks_for(T, n_kv, S)
    items = T * n_kv * n_chunks
    group = n_heads // n_kv
    part_max = np.empty((items, group), np.float32)
    part_sum = np.empty((items, group), np.float32)
    part_out = np.empty((items, group, Dv), np.float32)
    _attend_chunks(q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, part_max, part_sum, part_out)
    _merge(part_max, part_sum, part_out, n_chunks, out)
