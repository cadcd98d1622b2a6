"""SiLU and tanh-GELU over float32 arrays in numba, with the vectorisable exp of `vecmath`.

Both are x * sigmoid(z): SiLU with z = x, tanh-GELU with z = 2 sqrt(2/pi) (x + 0.044715 x^3),
since 0.5 (1 + tanh(u)) = sigmoid(2u). sigmoid(z) = 1 / (1 + e^-|z|) for z >= 0 and
e^-|z| / (1 + e^-|z|) below, so exp only sees arguments <= 0. numpy needed several passes
over the array (and numba's own np.exp/np.tanh call libm value by value, slower than numpy).
Large arrays (prefill) are split over the threads; a decode step's one row is not worth it.
`error_model="numpy"`: with numba's default a float division checks its divisor for zero to
raise ZeroDivisionError, a branch that kept LLVM from vectorising the loop.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .vecmath import exp_nonpositive

PARALLEL_MIN = 1 << 16  # elements
GELU_K = np.float32(2.0 * math.sqrt(2.0 / math.pi))
GELU_C = np.float32(0.044715)


@njit(inline="always", fastmath=True, error_model="numpy")
def _x_sigmoid(x, z):
    e = exp_nonpositive(-abs(z))
    return x * (np.float32(1.0) if z >= 0 else e) / (np.float32(1.0) + e)


@njit(fastmath=True, cache=True, error_model="numpy")
def _activate(x, out, gelu):
    """out = silu(x), or gelu_tanh(x) when `gelu` (a flag LLVM moves out of the loop)."""
    for i in range(x.shape[0]):
        v = x[i]
        out[i] = _x_sigmoid(v, GELU_K * (v + GELU_C * v * v * v) if gelu else v)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _activate_parallel(x, out, gelu, n_chunks):
    size = -(-x.shape[0] // n_chunks)
    for c in prange(n_chunks):
        _activate(x[c * size : (c + 1) * size], out[c * size : (c + 1) * size], gelu)


def _apply(x: np.ndarray, gelu: bool) -> np.ndarray:
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty_like(flat)
    if flat.size >= PARALLEL_MIN:
        _activate_parallel(flat, out, gelu, 16)
    else:
        _activate(flat, out, gelu)
    return out.reshape(x.shape)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x)."""
    return _apply(x, gelu=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return _apply(x, gelu=True)
