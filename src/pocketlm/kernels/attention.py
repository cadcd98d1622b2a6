"""Attention for a few new query tokens over the KV cache (decode), in numba.

Prefill uses batched BLAS matmuls (backends/cpu.py). Decode does not: calling BLAS for each
token's tiny products woke OpenBLAS's threads, whose spinning then halved the speed of the
numba matvecs around them (measured: Gemma 3 270M decode 6 tok/s with BLAS attention).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def attend(q, k, v, q_pos, k_pos, scale, window, softcap, alibi, out):
    """q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] -> out [T, Hq, Dv]; window/softcap 0 = off,
    alibi [Hq] or empty. The cache's prefix slices are C-contiguous, so rows vectorise. Each
    (token, head) pair is independent: they are spread over the threads."""
    T, n_heads, D = q.shape
    S, n_kv, Dv = v.shape
    group = n_heads // n_kv
    for th in prange(T * n_heads):
        t, h = th // n_heads, th % n_heads
        kh, qh = h // group, q[t, h]
        scores = np.empty(S, np.float32)
        best = np.float32(-np.inf)
        for s in range(S):
            delta = q_pos[t] - k_pos[s]
            if k_pos[s] < 0 or delta < 0 or (window > 0 and delta >= window):  # -1: empty slot
                scores[s] = -np.inf
                continue
            key = k[s, kh]
            acc = np.float32(0.0)
            for d in range(D):
                acc += qh[d] * key[d]
            acc *= scale
            if softcap > 0:
                acc = np.float32(math.tanh(acc / softcap)) * softcap
            if alibi.shape[0] > 0:
                acc += alibi[h] * np.float32(k_pos[s])
            scores[s] = acc
            best = max(best, acc)
        total = np.float32(0.0)
        for s in range(S):
            e = np.exp(scores[s] - best)  # exp(-inf) = 0 for masked keys
            scores[s] = e
            total += e
        inv = np.float32(1.0) / total
        dst = out[t, h]
        dst[:] = 0.0
        for s in range(S):
            p = scores[s] * inv
            if p != 0.0:
                value = v[s, kh]
                for d in range(Dv):
                    dst[d] += p * value[d]
