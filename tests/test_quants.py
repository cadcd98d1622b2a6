"""Block layouts: our numpy reference against gguf-py, and quantizer round-trip error bounds."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import random_blocks
from gguf import quants as gq

from pocketlm.formats.quants import BLOCK_LAYOUT, QUANTIZABLE, GGMLType, dequantize, quantize

rng = np.random.default_rng(0)


@pytest.mark.parametrize("tensor_type", list(GGMLType), ids=lambda k: k.name)
def test_dequantize_equals_gguf_py_on_random_blocks(tensor_type):
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    n_rows, blocks_per_row = 3, 5 if block_size > 1 else 96  # odd shapes: rows of several blocks
    blocks = random_blocks(tensor_type, n_rows * blocks_per_row)
    data = blocks.reshape(n_rows, -1)
    ours = dequantize(data, tensor_type, (n_rows, blocks_per_row * block_size))
    theirs = gq.dequantize(data, gguf.GGMLQuantizationType(int(tensor_type)))
    np.testing.assert_array_equal(ours, theirs)


def test_k_quant_block_with_known_values():
    """Q4_K by hand: d=1, dmin=0.5, sub-block 0 scale 2 / min 4, nibbles 0..15 repeating."""
    block = np.zeros(BLOCK_LAYOUT[GGMLType.Q4_K][1], np.uint8)
    block[0:2] = np.array([1.0], "<f2").view(np.uint8)
    block[2:4] = np.array([0.5], "<f2").view(np.uint8)
    block[4], block[8] = 2, 4  # scales[0] (sub-block 0 scale), scales[4] (sub-block 0 min)
    block[16:48] = np.arange(32) % 16
    values = dequantize(block, GGMLType.Q4_K, (256,))
    np.testing.assert_array_equal(values[:32], 2.0 * (np.arange(32) % 16) - 0.5 * 4)
    np.testing.assert_array_equal(values[32:64], 0.0)  # sub-block 1 has scale 0 and min 0


# max |x - round_trip(x)| relative to each block's largest magnitude: half a grid step (a whole
# one where ggml's symmetric grid clips the far end), plus the float16 rounding of the scale
ROUND_TRIP_BOUND = {
    GGMLType.F32: 0.0,
    GGMLType.F16: 1e-3,
    GGMLType.BF16: 4e-3,
    GGMLType.Q8_0: 0.5 / 127 + 1e-3,
    GGMLType.Q4_0: 1 / 8 + 1e-3,
    GGMLType.Q4_1: 1 / 15 + 2e-3,
    GGMLType.Q5_0: 1 / 16 + 1e-3,
    GGMLType.Q5_1: 1 / 31 + 2e-3,
}


@pytest.mark.parametrize("tensor_type", QUANTIZABLE, ids=lambda k: k.name)
def test_round_trip_error_is_within_half_a_step(tensor_type):
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 10, (64, 1))).astype(np.float32)
    y = dequantize(quantize(x, tensor_type), tensor_type, x.shape)
    blocks = np.abs(x).reshape(-1, max(block_size, 32)).max(axis=1, keepdims=True)
    err = np.abs(x - y).reshape(blocks.shape[0], -1) / blocks
    assert err.max() <= ROUND_TRIP_BOUND[tensor_type]


@pytest.mark.parametrize(
    "tensor_type", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.BF16]
)
def test_quantize_bytes_equal_gguf_py(tensor_type):
    x = rng.standard_normal((8, 128)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block must not divide by zero
    np.testing.assert_array_equal(
        quantize(x, tensor_type), gq.quantize(x, gguf.GGMLQuantizationType(int(tensor_type)))
    )


def test_quantize_rejects_rows_that_do_not_fill_blocks():
    from pocketlm.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="multiple of 32"):
        quantize(np.zeros((2, 48), np.float32), GGMLType.Q4_0)
