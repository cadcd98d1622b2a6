"""Products with 4-bit weights kept as nibbles, for the types whose values are 16 levels.

Q4_0, Q4_1 and Q4_K decompose into integers 0..15 (Q4_0's -8..7 shifted by 8, the shift
moved into the offset) with a float scale and offset per run of 32 values. Kept as nibbles
they take half the memory of the int8 repacking (`kernels.int8`), and a decode step, which
reads every weight once from DRAM, reads half the bytes.

Layout, chosen for the vectoriser: each run of 64 values of a row is 32 bytes; byte j holds
value j in its low nibble and value 32 + j in its high one, so the two halves of a byte meet
two contiguous runs of x, each with its own scale. The loop over a run of 32 bytes splits a
byte as v = lo + 16 hi with float arithmetic, hi = floor(v / 16): numba widens integer
`&` and `>>` to 64 bits, and LLVM then vectorised 8 lanes of 64-bit integers with gathers
(7 Gweights/s against 18-19 for the float form on the development machine).

    decode (one token):  y[r] = sum_b scale[r,b] * (q[r,b,:] . x[b,:]) + offset[r,b] * sum(x[b,:])
    prefill (T tokens):  dequantize a tile of rows to float32 once, multiply with BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..formats.quants import GGMLType, decompose
from .int8 import tiled_matmul
from .intdot import nibble_dot, quantize_activations
from .memory import prefetch_row, rows_ahead

TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)  # 16 levels per value, 32 values per scale
SUB = 32  # values per scale
RUN = 2 * SUB  # values per run of 32 bytes


@dataclass
class Int4Weight:
    packed: np.ndarray  # uint8 [rows, cols / 2], runs of 64 values as described above
    scale: np.ndarray  # float32 [rows, cols / 32]
    offset: np.ndarray  # float32 [rows, cols / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.offset.nbytes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return matvec(self, x)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return matmul(self, x)

    def rows(self, first: int, end: int) -> Int4Weight:
        """Rows first..end, a view."""
        return Int4Weight(self.packed[first:end], self.scale[first:end], self.offset[first:end])

    @staticmethod
    def stack(parts: list[Int4Weight]) -> Int4Weight | None:
        """One matrix of the parts' rows (same width), or None if they differ."""
        if len({p.shape[1] for p in parts}) != 1:
            return None
        return Int4Weight(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("packed", "scale", "offset"))
        )


def fits(tensor_type, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor can be held as nibbles: a 4-bit type, a matrix of whole runs."""
    return tensor_type in TYPES and len(shape) == 2 and shape[1] % RUN == 0


def repack(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> Int4Weight:
    """A Q4_0 / Q4_1 / Q4_K tensor [rows, cols] (cols a multiple of 64) -> Int4Weight."""
    if not fits(tensor_type, shape):
        raise ValueError(f"{tensor_type.name} {shape} cannot be held as nibbles")
    rows, cols = shape
    q, scale, offset = decompose(data, tensor_type)
    scale = np.ascontiguousarray(scale.reshape(rows, cols // SUB), dtype=np.float32)
    offset = (
        np.zeros_like(scale)
        if offset is None
        else np.ascontiguousarray(offset.reshape(rows, cols // SUB), dtype=np.float32)
    )
    q = q.reshape(rows, cols // RUN, 2, SUB)
    low = int(q.min()) if q.size else 0
    if low < 0:  # Q4_0: -8..7 -> 0..15; scale * (q + 8) - 8 * scale is exact (small integers times an f16)
        q = q - np.int8(low)
        offset -= np.float32(-low) * scale
    q = q.astype(np.uint8)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return Int4Weight(np.ascontiguousarray(packed.reshape(rows, cols // 2)), scale, offset)


# As in kernels.int8, inner loops index 1-D row views.


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _matvec(packed, scale, offset, x, out, ahead):
    rows, half = packed.shape
    xq, xd, x_sums, _ = quantize_activations(x)
    for r in prange(rows):
        prefetch_row(packed, r, ahead)  # request a later row now (see kernels.memory)
        prefetch_row(scale, r, ahead)
        prefetch_row(offset, r, ahead)
        out[r] = nibble_dot(packed[r], scale[r], offset[r], xq, xd, x_sums)


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(packed, scale, offset, first, out):
    rows, cols = out.shape
    n_runs = cols // RUN
    for i in prange(rows):
        row, row_scale, row_offset, dst = packed[first + i], scale[first + i], offset[first + i], out[i]
        for g in range(n_runs):
            s_lo, m_lo = row_scale[2 * g], row_offset[2 * g]
            s_hi, m_hi = row_scale[2 * g + 1], row_offset[2 * g + 1]
            for j in range(SUB):
                v = np.float32(row[g * SUB + j])
                hi = np.floor(v * np.float32(0.0625))
                dst[g * RUN + j] = (v - np.float32(16.0) * hi) * s_lo + m_lo
                dst[g * RUN + SUB + j] = hi * s_hi + m_hi


def matvec(w: Int4Weight, x: np.ndarray) -> np.ndarray:
    """W [rows, cols] @ x [cols] -> [rows] (float32), x quantized to int8 blocks for the
    scaled parts (`kernels.intdot`)."""
    out = np.empty(w.packed.shape[0], np.float32)
    _matvec(
        w.packed,
        w.scale,
        w.offset,
        np.ascontiguousarray(x, dtype=np.float32),
        out,
        rows_ahead(w.packed.shape[1]),
    )
    return out


def matmul(w: Int4Weight, x: np.ndarray) -> np.ndarray:
    """x [T, cols] @ W.T -> [T, rows], dequantizing W one tile of rows at a time."""
    return tiled_matmul(
        lambda first, tile: _dequantize_rows(w.packed, w.scale, w.offset, first, tile), w.shape, x
    )


def dequantize(w: Int4Weight) -> np.ndarray:
    """The float32 values of a repacked weight (for tests)."""
    out = np.empty(w.shape, np.float32)
    _dequantize_rows(w.packed, w.scale, w.offset, 0, out)
    return out
