"""Products with quantized weights repacked to int8 plus per-sub-block floats.

Every GGUF block type we read decomposes into small integers and a scale (and for some an
offset) per run of 16 or 32 values (`formats.quants.decompose`). Unpacking the 5/6-bit
fields once at load, into one int8 per weight, keeps the inner loops contiguous 8-bit loads
with float accumulation, which LLVM vectorises. The cost is memory: about 1.1-1.3 bytes per
weight instead of 0.69-0.82. The 4-bit types have their own layout and kernel (`kernels.int4`),
Q8_0 is read in place (`kernels.q8_0`); this module serves the other types, and any type
for the webgpu backend, which converts from this repacking.

    decode (one token):  y[r] = sum_b scale[r,b] * (q[r,b,:] . x[b,:]) + offset[r,b] * sum(x[b,:])
                         with x quantized to int8 blocks in the first term (`kernels.intdot`)
    prefill (T tokens):  dequantize a tile of rows to float32 once, multiply with BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..formats.quants import BLOCK_LAYOUT, GGMLType, decompose
from .intdot import int8_dot16, int8_dot32, quantize_activations
from .memory import load_f16, prefetch_row, rows_ahead

PREFILL_TILE_ROWS = 4096  # float32 tile of rows dequantized at a time for prefill


@dataclass
class Int8Weight:
    q: np.ndarray  # int8 [rows, cols]
    scale: np.ndarray  # float32 [rows, n_sub]
    offset: np.ndarray  # float32 [rows, n_sub], or [rows, 0] when the type has none
    sub: int  # values per scale

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + self.offset.nbytes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return matvec(self, x)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return matmul(self, x)

    def rows(self, first: int, end: int) -> Int8Weight:
        """Rows first..end, a view."""
        return Int8Weight(self.q[first:end], self.scale[first:end], self.offset[first:end], self.sub)

    @staticmethod
    def stack(parts: list[Int8Weight]) -> Int8Weight | None:
        """One matrix of the parts' rows (same width and sub-block), or None if they differ."""
        if len({(p.shape[1], p.sub, p.offset.shape[1]) for p in parts}) != 1:
            return None
        return Int8Weight(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scale", "offset")), parts[0].sub
        )


def repack(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> Int8Weight:
    """A quantized GGUF tensor [rows, cols] -> Int8Weight."""
    if tensor_type == GGMLType.Q5_0:  # Gemma 3's commonest type: numba, 0.26 -> 0.03 s for its 63 M values
        blocks = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_LAYOUT[tensor_type][1])
        q, scale = np.empty((len(blocks), 32), np.int8), np.empty(len(blocks), np.float32)
        _unpack_q5_0(blocks, q, scale)
        return _weight(q, scale, None, tensor_type, shape)
    return unpack(data, tensor_type, shape)


def unpack(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> Int8Weight:
    """`repack` with numpy alone (`formats.quants.decompose`): no compiled kernel to load, for a
    caller that runs none (the webgpu backend uploads these arrays)."""
    q, scale, offset = decompose(data, tensor_type)
    return _weight(q, scale, offset, tensor_type, shape)


def _weight(q, scale, offset, tensor_type, shape: tuple[int, ...]) -> Int8Weight:
    rows, cols = shape
    scale = np.ascontiguousarray(scale.reshape(rows, -1), dtype=np.float32)
    offset = (
        np.zeros((rows, 0), np.float32) if offset is None else np.ascontiguousarray(offset.reshape(rows, -1))
    )
    if cols // scale.shape[1] not in (16, 32):  # the decode kernels' two layouts (kernels.intdot)
        raise ValueError(f"{tensor_type.name}: {cols // scale.shape[1]} values a scale, not 16 or 32")
    return Int8Weight(np.ascontiguousarray(q.reshape(rows, cols)), scale, offset, cols // scale.shape[1])


@njit(parallel=True, cache=True)
def _unpack_q5_0(blocks, q, scale):
    """Q5_0 blocks [n, 22] (f16 d, 32 high bits, 16 bytes of nibbles) -> q [n, 32] = value - 16,
    scale [n] = d; the same as `formats.quants.decompose`."""
    for i in prange(blocks.shape[0]):
        b = blocks[i]
        scale[i] = load_f16(b, 0)
        for j in range(16):
            q[i, j], q[i, j + 16] = q5_0_values(b, 0, j)


@njit(inline="always")
def q5_0_values(block, start, j):
    """Values j and j + 16 (-16..15) of the Q5_0 block at byte `start` of `block`."""
    fifth = (
        np.uint32(block[start + 2])
        | (np.uint32(block[start + 3]) << 8)
        | (np.uint32(block[start + 4]) << 16)
        | (np.uint32(block[start + 5]) << 24)
    )
    nibbles = block[start + 6 + j]
    low = np.int32(nibbles & 15) | np.int32(((fifth >> j) & 1) << 4)
    high = np.int32(nibbles >> 4) | np.int32(((fifth >> (j + 16)) & 1) << 4)
    return low - 16, high - 16


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _matvec(q, scale, offset, sub, x, out, ahead):
    rows, cols = q.shape
    n_sub = cols // sub
    has_offset = offset.shape[1] > 0
    xq, xd, block_sums, xq4 = quantize_activations(x)
    # for the offsets: x as rounded, per sub-block (the quantizer's own sums where sub-blocks are its blocks)
    x_sums = block_sums if sub == 32 else np.zeros(n_sub if has_offset else 0, np.float32)
    for j in range(cols if has_offset and sub != 32 else 0):
        x_sums[j // sub] += np.float32(xq[j]) * xd[j // 32]
    for r in prange(rows):
        prefetch_row(q, r, ahead)  # request a later row now (see kernels.memory)
        prefetch_row(scale, r, ahead)
        prefetch_row(offset, r, ahead)
        if sub == 16:
            acc = int8_dot16(q[r], scale[r], xq, xd, xq4)
        else:
            acc = int8_dot32(q[r], scale[r], xq, xd, xq4)
        if has_offset:
            row_offset = offset[r]
            for b in range(n_sub):
                acc += row_offset[b] * x_sums[b]
        out[r] = acc


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(q, scale, offset, sub, first, out):
    rows, cols = out.shape
    n_sub = cols // sub
    has_offset = offset.shape[1] > 0
    for i in prange(rows):
        row, row_scale, row_offset, dst = q[first + i], scale[first + i], offset[first + i], out[i]
        for b in range(n_sub):
            s = row_scale[b]
            for j in range(sub):
                dst[b * sub + j] = np.float32(row[b * sub + j]) * s
        if has_offset:
            for b in range(n_sub):
                m = row_offset[b]
                for j in range(sub):
                    dst[b * sub + j] += m


def matvec(w: Int8Weight, x: np.ndarray) -> np.ndarray:
    """W [rows, cols] @ x [cols] -> [rows] (float32)."""
    out = np.empty(w.q.shape[0], np.float32)
    _matvec(
        w.q,
        w.scale,
        w.offset,
        w.sub,
        np.ascontiguousarray(x, dtype=np.float32),
        out,
        rows_ahead(w.q.shape[1]),
    )
    return out


def matmul(w: Int8Weight, x: np.ndarray) -> np.ndarray:
    """x [T, cols] @ W.T -> [T, rows], dequantizing W one tile of rows at a time."""
    return tiled_matmul(
        lambda first, tile: _dequantize_rows(w.q, w.scale, w.offset, w.sub, first, tile), w.shape, x
    )


def tiled_matmul(dequantize_rows, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """x [T, cols] @ W.T -> [T, rows] for a weight W [rows, cols] that `dequantize_rows(first,
    tile)` writes to float32, PREFILL_TILE_ROWS rows at a time, each tile multiplied with BLAS."""
    rows, cols = shape
    out = np.empty((len(x), rows), np.float32)
    tile = np.empty((min(rows, PREFILL_TILE_ROWS), cols), np.float32)
    for first in range(0, rows, PREFILL_TILE_ROWS):
        n = min(PREFILL_TILE_ROWS, rows - first)
        dequantize_rows(first, tile[:n])
        np.matmul(x, tile[:n].T, out=out[:, first : first + n])
    return out


def dequantize(w: Int8Weight) -> np.ndarray:
    """The float32 values of a repacked weight (for tests)."""
    out = np.empty(w.q.shape, np.float32)
    _dequantize_rows(w.q, w.scale, w.offset, w.sub, 0, out)
    return out
