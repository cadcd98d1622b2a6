"""Attention for a few new query tokens over the KV cache (decode), in numba.

Prefill uses batched BLAS matmuls (backends/cpu.py). Decode does not: calling BLAS for each
token's tiny products woke OpenBLAS's threads, whose spinning then halved the speed of the
numba matvecs around them (measured: Gemma 3 270M decode 6 tok/s with BLAS attention).

Decode attention reads the whole cache once per token (SmolLM2 at 620 tokens: 29 MB over its
30 layers, as much as a fifth of its weights), so the kernel is written for memory: the
keys are split into chunks, each read whole (all heads) front to back by one thread, keeping
per head its own softmax maximum and sum, merged at the end (as flash-decoding does); keys
and values a few positions ahead are prefetched.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .memory import PREFETCH, prefetch
from .vecmath import exp_nonpositive, tanh

WORK_ITEMS = 16  # (token, chunk of keys) items to spread over the threads, at least
MIN_CHUNK = 32  # keys
AHEAD = 4  # keys prefetched ahead


@njit(inline="always")
def _visible(query_pos, key_pos, window):
    """Whether a query sees a key: not later, within the window (0: none); -1 is an empty slot."""
    delta = query_pos - key_pos
    return key_pos >= 0 and delta >= 0 and not (window > 0 and delta >= window)


def chunks_for(T: int, S: int) -> int:
    """How many chunks to split the keys into."""
    return max(1, min(-(-WORK_ITEMS // T), S // MIN_CHUNK))


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _attend_chunks(
    q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, ahead, part_max, part_sum, part_out
):
    """Each (token, chunk of keys) item, for every head: the scores over the chunk's keys, their
    maximum and sum of exponentials, and the exponential-weighted sum of values (not yet
    divided). An item reads its keys' rows of the cache whole, all kv heads, front to back,
    prefetching `ahead` keys ahead (0: none; kernels.memory.PREFETCH).

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
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]; window/softcap 0 = off,
    alibi [Hq] or empty. Every query must see at least one key (its own)."""
    T, n_heads, _ = q.shape
    S, _, Dv = v.shape
    n_chunks = chunks_for(T, S)
    part_max = np.empty((T * n_chunks, n_heads), np.float32)
    part_sum = np.empty((T * n_chunks, n_heads), np.float32)
    part_out = np.empty((T * n_chunks, n_heads, Dv), np.float32)
    ahead = AHEAD if PREFETCH else 0
    _attend_chunks(
        q, k, v, q_pos, k_pos, scale, window, softcap, alibi, n_chunks, ahead, part_max, part_sum, part_out
    )
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
