"""Matrices of GGUF blocks read as the file lays them out (no repacking): Q8_0 and Q5_0.

A Q8_0 block is an f16 scale and 32 int8 values (34 bytes): the int8 repacking would only
widen the scale to float32 (36 bytes a block) and cost a conversion at load (Gemma 3's 168
M-value embedding, which is also its output matrix: 0.6 s and 190 MB of transient memory).
A Q5_0 block is an f16 scale, 32 fifth bits and 16 bytes of nibbles (22 bytes for 32 values
-16..15, 5.5 bits a value). Gemma 3 270M's Q4_K_M file holds most of its matrices so (the
K-quants need rows of 256 values, its rows are 640): 63 M values, 44 MB; repacked to int8 they
took 71 MB and 4 ms of a decode step.

The kernels read the blocks from the mapped file or from a plain copy of its bytes (the CPU
backend's `_resident`, and stacked q/k/v or gate/up). Decode (`kernels.intdot`) rebuilds a
block's values plus a bias as unsigned bytes in vector registers (Q8_0: the sign bit flipped,
+ 128; Q5_0: nibbles and a mask of fifth bits, + 16) and multiplies them with the quantized
activations; the bias is taken back with the activations' sums:

    decode (one token):  y[r] = sum_b d[r,b] xd[b] ((v[r,b,:] + bias) . xq[b,:] - bias sum(xq[b,:]))
    prefill (T tokens):  dequantize a tile of rows to float32 once, multiply with BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..formats.quants import BLOCK_LAYOUT, GGMLType
from .int8 import q5_0_values, tiled_matmul
from .intdot import Q5_0_BYTES, Q8_0_BYTES, q5_0_dot, q8_0_dot, quantize_activations
from .memory import load_f16, prefetch_row, rows_ahead

TYPES = (GGMLType.Q8_0, GGMLType.Q5_0)
BLOCK = 32  # values a block, both types
assert BLOCK_LAYOUT[GGMLType.Q8_0] == (BLOCK, Q8_0_BYTES) and BLOCK_LAYOUT[GGMLType.Q5_0] == (
    BLOCK,
    Q5_0_BYTES,
)


@dataclass
class BlockWeight:
    blocks: np.ndarray  # uint8 [rows, cols / 32 * block bytes], the file's bytes (mapped, or a copy)
    type: GGMLType
    in_place: bool = True  # its bytes are one tensor's blocks from the file (False: stacked)

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] // BLOCK_LAYOUT[self.type][1] * BLOCK

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def _q5(self) -> bool:
        return self.type == GGMLType.Q5_0

    def matvec(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(self.blocks.shape[0], np.float32)
        _matvec(
            self.blocks,
            self._q5,
            np.ascontiguousarray(x, dtype=np.float32),
            out,
            rows_ahead(self.blocks.shape[1]),
        )
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return tiled_matmul(
            lambda first, tile: _dequantize_rows(self.blocks, self._q5, first, tile), self.shape, x
        )

    def dequantize(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        _dequantize_rows(self.blocks, self._q5, 0, out)
        return out

    def rows(self, first: int, end: int) -> BlockWeight:
        """Rows first..end, a view."""
        return BlockWeight(self.blocks[first:end], self.type, self.in_place)

    @staticmethod
    def stack(parts: list[BlockWeight]) -> BlockWeight | None:
        """One matrix of the parts' rows (same type and width): a copy of their blocks, or None."""
        if len({(p.type, p.shape[1]) for p in parts}) != 1:
            return None
        return BlockWeight(np.concatenate([p.blocks for p in parts]), parts[0].type, in_place=False)


def fits(tensor_type, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor is a matrix of a type read here."""
    return tensor_type in TYPES and len(shape) == 2


def wrap(data: np.ndarray, tensor_type: GGMLType, shape: tuple[int, ...]) -> BlockWeight:
    """A Q8_0 or Q5_0 tensor's bytes [rows, cols / 32 * block bytes] (a view; nothing is copied)."""
    if not fits(tensor_type, shape):
        raise ValueError(f"{tensor_type.name} {shape}: not a Q8_0 or Q5_0 matrix")
    rows, cols = shape
    return BlockWeight(
        np.asarray(data).view(np.uint8).reshape(rows, cols // BLOCK * BLOCK_LAYOUT[tensor_type][1]),
        tensor_type,
    )


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _matvec(blocks, q5, x, out, ahead):
    rows = blocks.shape[0]
    xq, xd, _, xq4 = quantize_activations(x)
    for r in prange(rows):
        prefetch_row(blocks, r, ahead)  # request a later row now (see kernels.memory)
        out[r] = q5_0_dot(blocks[r], xq, xd, xq4) if q5 else q8_0_dot(blocks[r], xq, xd, xq4)


@njit(parallel=True, fastmath=True, cache=True)
def _dequantize_rows(blocks, q5, first, out):
    rows = out.shape[0]
    block_bytes = Q5_0_BYTES if q5 else Q8_0_BYTES
    n_blocks = blocks.shape[1] // block_bytes
    for i in prange(rows):
        row, dst = blocks[first + i], out[i]
        for b in range(n_blocks):
            start = b * block_bytes
            d = load_f16(row, start)
            if q5:
                for j in range(16):
                    low, high = q5_0_values(row, start, j)
                    dst[b * BLOCK + j] = np.float32(low) * d
                    dst[b * BLOCK + 16 + j] = np.float32(high) * d
            else:
                for j in range(BLOCK):
                    dst[b * BLOCK + j] = np.float32(np.int8(row[start + 2 + j])) * d
