"""Q8_0 matrices read as the file lays them out: no repacking.

A Q8_0 block is an f16 scale and 32 int8 values (34 bytes): the int8 repacking would only
widen the scale to float32 (36 bytes a block) and cost a conversion at load (Gemma 3's 168
M-value embedding, which is also its output matrix: 0.6 s and 190 MB of transient memory). The
kernels read the blocks as they are, from the mapped file or a plain copy of its bytes (the
CPU backend's `_resident`), the scales through `memory.load_f16`.

    decode (one token):  y[r] = sum_b d[r,b] xd[b] ((q[r,b,:] + 128) . xq[b,:] - 128 sum(xq[b,:]))
                         with the activations quantized to int8 blocks (`kernels.intdot`)
    prefill (T tokens):  dequantize a tile of rows to float32 once, multiply with BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..formats.quants import BLOCK_LAYOUT, GGMLType
from .int8 import tiled_matmul
from .intdot import q8_0_dot, quantize_activations
from .memory import CACHE_LINE, load_f16, prefetch, rows_ahead

BLOCK, BLOCK_BYTES = BLOCK_LAYOUT[GGMLType.Q8_0]  # 32 values, 34 bytes


@dataclass
class Q8_0Weight:
    blocks: np.ndarray  # int8 [rows, cols / 32 * 34], the file's bytes (mapped, or a resident copy)
    in_place = True  # its bytes are the file's blocks, not a repacking

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] // BLOCK_BYTES * BLOCK

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(self.blocks.shape[0], np.float32)
        _matvec(self.blocks, np.ascontiguousarray(x, dtype=np.float32), out, rows_ahead(self.blocks.shape[1]))
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return tiled_matmul(lambda first, tile: _dequantize_rows(self.blocks, first, tile), self.shape, x)

    def dequantize(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        _dequantize_rows(self.blocks, 0, out)
        return out


def wrap(data: np.ndarray, shape: tuple[int, ...]) -> Q8_0Weight:
    """A Q8_0 tensor's bytes [rows, cols / 32 * 34] (a view; nothing is copied)."""
    rows, cols = shape
    return Q8_0Weight(np.asarray(data).view(np.int8).reshape(rows, cols // BLOCK * BLOCK_BYTES))


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _matvec(blocks, x, out, ahead):
    rows, row_bytes = blocks.shape
    xq, xd, _, xq4 = quantize_activations(x)
    for r in prange(rows):
        if r + ahead < rows:  # request a later row now (see kernels.memory)
            later = blocks[r + ahead]
            for c in range(0, row_bytes, CACHE_LINE):
                prefetch(later, c)
            prefetch(later, row_bytes - 1)
        out[r] = q8_0_dot(blocks[r], xq, xd, xq4)


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(blocks, first, out):
    rows = out.shape[0]
    n_blocks = blocks.shape[1] // BLOCK_BYTES
    for i in prange(rows):
        row, dst = blocks[first + i], out[i]
        for b in range(n_blocks):
            d = load_f16(row, b * BLOCK_BYTES)
            for j in range(BLOCK):
                dst[b * BLOCK + j] = np.float32(row[b * BLOCK_BYTES + 2 + j]) * d
