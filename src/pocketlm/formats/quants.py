"""GGML block layouts, written once in numpy: the reference every fast kernel is tested against.

A quantized row is a run of blocks; each block packs `block_size` values in `type_size` bytes.
`decompose` unpacks quantized blocks into integers and per-sub-block scales and offsets (the
layout, written once), `dequantize` turns any tensor into float32, and `quantize` goes the other
way for the types the converter writes.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from ..errors import UnsupportedError

QK_K = 256  # elements in a k-quant super-block


class GGMLType(IntEnum):
    """Tensor type ids as GGUF stores them (ggml's `ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# type -> (elements per block, bytes per block)
BLOCK_LAYOUT: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}


def ggml_type(value: int | str) -> GGMLType:
    """The GGMLType for an id or a name ("q4_0"), or an UnsupportedError naming the ones we know."""
    try:
        return GGMLType[value.upper()] if isinstance(value, str) else GGMLType(value)
    except (KeyError, ValueError):
        known = ", ".join(t.name for t in GGMLType)
        raise UnsupportedError(f"tensor type {value!r} is not supported (supported: {known})") from None


def tensor_nbytes(tensor_type: GGMLType, n_elements: int) -> int:
    block_size, type_size = BLOCK_LAYOUT[tensor_type]
    if n_elements % block_size:
        raise UnsupportedError(
            f"{tensor_type.name} needs a multiple of {block_size} elements per row, got {n_elements}"
        )
    return n_elements // block_size * type_size


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """A float16 field at byte `start` of every block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32]: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits, bit j for element j."""
    bits = qh.copy().view("<u4")
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


# ---- dequantizers -------------------------------------------------------------------------------


def _deq_f32(b):
    return b.copy().view("<f4")


def _deq_f16(b):
    return b.copy().view("<f2").astype(np.float32)


def _deq_bf16(b):
    return (b.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


# Quantized types decompose into integers and per-sub-block floats: value = scale * q + offset.
# Each returns (q int8 [n, block], scale f32 [n, n_sub], offset f32 [n, n_sub] or None).


def _dec_q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b, 0), None


def _dec_q4_0(b):
    return (_nibbles(b[:, 2:]).astype(np.int8) - 8), _f16(b, 0), None


def _dec_q4_1(b):
    return _nibbles(b[:, 4:]).astype(np.int8), _f16(b, 0), _f16(b, 2)


def _dec_q5_0(b):
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return q.astype(np.int8) - 16, _f16(b, 0), None


def _dec_q5_1(b):
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return q.astype(np.int8), _f16(b, 0), _f16(b, 2)


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty((len(s), 8), np.uint8)
    mn = np.empty((len(s), 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 8, 32]: each 32-byte group gives sub-block 2i (low) and 2i+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _dec_q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    q = _k_low_nibbles(b[:, 16:]).astype(np.int8).reshape(-1, QK_K)
    return q, d * sc, -(dmin * mn)


def _dec_q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # bit i of qh[l] is the fifth bit of element l of sub-block i
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (_k_low_nibbles(b[:, 48:]) | (high << 4)).astype(np.int8).reshape(-1, QK_K)
    return q, d * sc, -(dmin * mn)


def _dec_q6_k(b):
    n = len(b)
    ql = b[:, :128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    # Each half of 128 elements: four runs of 32, low 4 bits from ql, high 2 bits from qh.
    low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.int8) - 32  # [n, 2, 4, 32]; one scale per 16 elements
    return q.reshape(n, QK_K), _f16(b, 208) * scales, None


# ---- quantizers (the types the converter writes), rounding as ggml's reference code -------------


def _quant_f32(x):
    return x.astype("<f4").view(np.uint8)


def _quant_f16(x):
    return x.astype("<f2").view(np.uint8)


def _quant_bf16(x):
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype("<u2").view(np.uint8)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))


def _quant_q8_0(x):
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    q = np.round(x * _safe_inverse(d)).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, sign kept (ggml scales symmetric types by it)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)


def _quant_q4_0(x):
    d = _signed_max(x) / -8
    q = np.clip(np.trunc(x * _safe_inverse(d) + 8.5), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _quant_q4_1(x):
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    q = np.clip(np.trunc((x - lo) * _safe_inverse(d) + 0.5), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=1)


def _quant_q5_0(x):
    d = _signed_max(x) / -16
    q = np.clip(np.trunc(x * _safe_inverse(d) + 16.5), 0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q & 0x0F)], axis=1)


def _quant_q5_1(x):
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / 31
    q = np.clip(np.trunc((x - lo) * _safe_inverse(d) + 0.5), 0, 31).astype(np.uint8)
    parts = [_f16_bytes(d), _f16_bytes(lo), _pack_high_bits(q), _pack_nibbles(q & 0x0F)]
    return np.concatenate(parts, axis=1)


_DECOMPOSE = {
    GGMLType.Q8_0: _dec_q8_0,
    GGMLType.Q4_0: _dec_q4_0,
    GGMLType.Q4_1: _dec_q4_1,
    GGMLType.Q5_0: _dec_q5_0,
    GGMLType.Q5_1: _dec_q5_1,
    GGMLType.Q4_K: _dec_q4_k,
    GGMLType.Q5_K: _dec_q5_k,
    GGMLType.Q6_K: _dec_q6_k,
}
_FLOAT_TYPES = {GGMLType.F32: _deq_f32, GGMLType.F16: _deq_f16, GGMLType.BF16: _deq_bf16}

_QUANTIZE = {
    GGMLType.F32: _quant_f32,
    GGMLType.F16: _quant_f16,
    GGMLType.BF16: _quant_bf16,
    GGMLType.Q8_0: _quant_q8_0,
    GGMLType.Q4_0: _quant_q4_0,
    GGMLType.Q4_1: _quant_q4_1,
    GGMLType.Q5_0: _quant_q5_0,
    GGMLType.Q5_1: _quant_q5_1,
}

QUANTIZABLE = tuple(_QUANTIZE)


def decompose(data: np.ndarray, tensor_type: GGMLType) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw bytes of a quantized tensor -> (q int8 [n_blocks, block_size], scale f32
    [n_blocks, n_sub], offset f32 [n_blocks, n_sub] or None): each run of block_size / n_sub
    values is scale * q + offset."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_LAYOUT[tensor_type][1])
    return _DECOMPOSE[tensor_type](blocks)


def dequantize(data: np.ndarray, tensor_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of a tensor -> float32 array of `shape` (numpy order, last axis = row)."""
    if tensor_type in _FLOAT_TYPES:
        return _FLOAT_TYPES[tensor_type](
            np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_LAYOUT[tensor_type][1])
        ).reshape(shape)
    q, scale, offset = decompose(data, tensor_type)
    n, n_sub = scale.shape
    values = q.reshape(n, n_sub, -1).astype(np.float32) * scale[:, :, None]
    if offset is not None:
        values += offset[:, :, None]
    return values.reshape(shape)


def quantize(x: np.ndarray, tensor_type: GGMLType) -> np.ndarray:
    """float32 array whose last axis is a multiple of the block size -> uint8 [..., row bytes]."""
    if tensor_type not in _QUANTIZE:
        raise UnsupportedError(f"pocketlm cannot write {tensor_type.name} tensors")
    block_size, type_size = BLOCK_LAYOUT[tensor_type]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % block_size:
        raise UnsupportedError(f"{tensor_type.name} needs rows that are a multiple of {block_size}")
    packed = _QUANTIZE[tensor_type](x.reshape(-1, block_size))
    return packed.reshape(*x.shape[:-1], x.shape[-1] // block_size * type_size)
