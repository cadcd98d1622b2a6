"""Q5_0 matrices read as the file lays them out, multiplied with int8 activations.

A Q5_0 block is an f16 scale d, 32 fifth bits and 16 bytes of nibbles (22 bytes for 32
values -16..15, 5.5 bits a value). Gemma 3 270M's Q4_K_M file holds most of its matrices so
(the K-quants need rows of 256 values, its rows are 640): 63 M values, 44 MB. Repacked to
int8 they took 71 MB and 4 ms of a decode step; read as they are (from the mapped file, or
a copy when q/k/v or gate/up are stacked), the decode step reads 44 MB.

Decode (`kernels.intdot.q5_0_dot`) rebuilds each block's values + 16 (0..31) in vector
registers, the fifth bits through a 32-bit mask, and multiplies them with the quantized
activations as bytes; the + 16 is taken back with the sums of the activations:

    decode (one token):  y[r] = sum_b d[r,b] xd[b] ((v[r,b,:] + 16) . xq[b,:] - 16 sum(xq[b,:]))
    prefill (T tokens):  dequantize a tile of rows to float32 once, multiply with BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..formats.quants import BLOCK_LAYOUT, GGMLType
from .int8 import q5_0_values, tiled_matmul
from .intdot import Q5_0_BYTES, q5_0_dot, quantize_activations
from .memory import CACHE_LINE, load_f16, prefetch, rows_ahead

BLOCK, BLOCK_BYTES = BLOCK_LAYOUT[GGMLType.Q5_0]  # 32 values, 22 bytes
assert BLOCK_BYTES == Q5_0_BYTES


@dataclass
class Q5_0Weight:
    blocks: np.ndarray  # uint8 [rows, cols / 32 * 22], the file's bytes (mapped, or a resident copy)
    in_place: bool = True  # its bytes are one tensor's blocks from the file (False: stacked)

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

    def rows(self, first: int, end: int) -> "Q5_0Weight":
        """Rows first..end, a view."""
        return Q5_0Weight(self.blocks[first:end], self.in_place)

    @staticmethod
    def stack(parts: list["Q5_0Weight"]) -> "Q5_0Weight | None":
        """One matrix of the parts' rows (same width): a copy of their blocks, which then are no
        longer read from the file (same memory), or None if the widths differ."""
        if len({p.shape[1] for p in parts}) != 1:
            return None
        return Q5_0Weight(np.concatenate([p.blocks for p in parts]), in_place=False)


def fits(kind, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor can be read in place here: a Q5_0 matrix."""
    return kind == GGMLType.Q5_0 and len(shape) == 2


def wrap(data: np.ndarray, shape: tuple[int, ...]) -> Q5_0Weight:
    """A Q5_0 tensor's bytes [rows, cols / 32 * 22] (a view; nothing is copied)."""
    rows, cols = shape
    return Q5_0Weight(np.asarray(data).view(np.uint8).reshape(rows, cols // BLOCK * BLOCK_BYTES))


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
        out[r] = q5_0_dot(blocks[r], xq, xd, xq4)


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(blocks, first, out):
    rows = out.shape[0]
    n_blocks = blocks.shape[1] // BLOCK_BYTES
    for i in prange(rows):
        row, dst = blocks[first + i], out[i]
        for b in range(n_blocks):
            start = b * BLOCK_BYTES
            d = load_f16(row, start)
            for j in range(16):
                low, high = q5_0_values(row, start, j)
                dst[b * BLOCK + j] = np.float32(low) * d
                dst[b * BLOCK + 16 + j] = np.float32(high) * d
