"""The numba int8 and nibble kernels against the numpy reference dequantizers, for every quantized type.

The decode kernels of the nibble and Q5_0 matrices multiply int8-quantized activations
(`kernels.intdot`): they are checked against the reference weights times the activations as
quantized, to float rounding, and the quantization itself against its half-step bound."""

from __future__ import annotations

import functools
import os
import platform
import re
import sys

import numpy as np
import pytest
from conftest import random_blocks

from pocketlm.errors import InvalidOptionError
from pocketlm.formats.quants import BLOCK_LAYOUT, GGMLType, dequantize
from pocketlm.kernels import attention, blocks, int4, int8, intdot, isa

QUANTIZED = [k for k in GGMLType if k not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)]


def weight(tensor_type, rows, blocks_per_row, seed=0):
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    data = random_blocks(tensor_type, rows * blocks_per_row, seed).reshape(rows, -1)
    shape = (rows, blocks_per_row * block_size)
    return data, shape, dequantize(data, tensor_type, shape)


@pytest.mark.parametrize("tensor_type", QUANTIZED, ids=lambda k: k.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (37, 3), (130, 2)])
def test_repacked_weights_dequantize_to_the_reference(tensor_type, rows, blocks_per_row):
    data, shape, expected = weight(tensor_type, rows, blocks_per_row)
    np.testing.assert_array_equal(int8.dequantize(int8.repack(data, tensor_type, shape)), expected)


@pytest.mark.parametrize("tensor_type", QUANTIZED, ids=lambda k: k.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (37, 3), (130, 2)])
def test_matvec_equals_reference_product(tensor_type, rows, blocks_per_row):
    data, shape, expected = weight(tensor_type, rows, blocks_per_row, seed=1)
    x = np.random.default_rng(2).standard_normal(shape[1]).astype(np.float32)
    w = int8.repack(data, tensor_type, shape)
    scaled = int8.dequantize(int8.Int8Weight(w.q, w.scale, np.zeros_like(w.offset), w.sub))
    offsets = np.repeat(w.offset, w.sub, axis=1) if w.offset.shape[1] else np.zeros_like(scaled)
    np.testing.assert_array_equal(scaled + offsets, expected)
    assert_close_to_integer_product(int8.matvec(w, x), scaled, x, offsets)


def quantized(x):
    """x as the integer kernels see it: rounded to int8 blocks by `intdot.quantize`, in float64."""
    q, d, _, _ = intdot.quantize(x)
    return (q.reshape(-1, 32).astype(np.float64) * d[:, None]).ravel()


def assert_close_to_integer_product(ours, scaled, x, offsets=None):
    """The weights (scaled parts and offsets) meet x as quantized; to float rounding (1e-6 of the
    size of the terms summed)."""
    offsets = np.zeros_like(scaled) if offsets is None else offsets
    reference = (scaled.astype(np.float64) + offsets.astype(np.float64)) @ quantized(x)
    size = (np.abs(scaled).sum(axis=1) + np.abs(offsets).sum(axis=1)) * np.abs(x).max()
    assert np.all(np.abs(ours - reference) <= 1e-6 * size + 1e-6)


def test_activation_quantization_rounds_each_block_of_32_to_int8_within_half_a_step():
    rng = np.random.default_rng(20)
    x = (rng.standard_normal(32 * 40) * np.repeat(rng.uniform(0, 50, 40), 32)).astype(np.float32)
    x[:32] = 0.0  # an all-zero block
    x[32:64] = np.float32(1e-30)  # tiny values
    q, d, sums, sums4 = intdot.quantize(x)
    blocks, qb = x.reshape(-1, 32).astype(np.float64), q.reshape(-1, 32).astype(np.int64)
    assert q.dtype == np.int8 and d.shape == sums.shape == (40,) and sums4.shape == (320,)
    assert list(np.abs(qb).max(axis=1)) == [0] + [127] * 39  # the largest value of a block is +-127
    assert np.all(np.abs(qb * d[:, None].astype(np.float64) - blocks) <= d[:, None] * (0.5 + 1e-6))
    np.testing.assert_allclose(sums, qb.sum(axis=1) * d, rtol=1e-6)  # the sums as rounded
    np.testing.assert_array_equal(sums4, q.reshape(-1, 4).astype(np.int64).sum(axis=1))
    with pytest.raises(ValueError, match="whole blocks"):
        intdot.quantize(np.zeros(48, np.float32))


@pytest.mark.parametrize("tensor_type", QUANTIZED, ids=lambda k: k.name)
def test_matmul_equals_reference_product_across_tiles(tensor_type, monkeypatch):
    monkeypatch.setattr(int8, "PREFILL_TILE_ROWS", 16)  # several tiles and a ragged last one
    data, shape, expected = weight(tensor_type, 45, 2, seed=3)
    x = np.random.default_rng(4).standard_normal((7, shape[1])).astype(np.float32)
    np.testing.assert_allclose(
        int8.matmul(int8.repack(data, tensor_type, shape), x), x @ expected.T, rtol=1e-4, atol=1e-3
    )


def test_rms_norm_kernel_equals_the_numpy_formula():
    from pocketlm.kernels.norms import rms_norm_rows

    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((5, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    rms_norm_rows(x, w, 1e-6, out)
    np.testing.assert_allclose(
        out, x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6) * w, rtol=1e-5, atol=1e-6
    )


FOUR_BIT = list(int4.TYPES)


@pytest.mark.parametrize("tensor_type", FOUR_BIT, ids=lambda k: k.name)
@pytest.mark.parametrize("rows, runs_per_row", [(1, 1), (37, 3), (130, 4)])
def test_nibble_repacking_dequantizes_to_the_reference(tensor_type, rows, runs_per_row):
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    data, shape, expected = weight(tensor_type, rows, max(1, runs_per_row * 64 // block_size))
    np.testing.assert_array_equal(int4.dequantize(int4.repack(data, tensor_type, shape)), expected)


@pytest.mark.parametrize("tensor_type", FOUR_BIT, ids=lambda k: k.name)
@pytest.mark.parametrize("rows, runs_per_row", [(1, 1), (37, 3), (130, 4), (2000, 10)])
def test_nibble_matvec_equals_reference_product(tensor_type, rows, runs_per_row):
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    data, shape, expected = weight(tensor_type, rows, max(1, runs_per_row * 64 // block_size), seed=5)
    x = np.random.default_rng(6).standard_normal(shape[1]).astype(np.float32)
    w = int4.repack(data, tensor_type, shape)
    scaled = int4.dequantize(int4.Int4Weight(w.packed, w.scale, np.zeros_like(w.offset)))
    offsets = np.repeat(w.offset, 32, axis=1)
    np.testing.assert_array_equal(scaled + offsets, expected)
    assert_close_to_integer_product(int4.matvec(w, x), scaled, x, offsets)


@pytest.mark.parametrize("tensor_type", FOUR_BIT, ids=lambda k: k.name)
def test_nibble_matmul_equals_reference_product_across_tiles(tensor_type, monkeypatch):
    monkeypatch.setattr(int8, "PREFILL_TILE_ROWS", 16)
    block_size, _ = BLOCK_LAYOUT[tensor_type]
    data, shape, expected = weight(tensor_type, 45, max(1, 128 // block_size), seed=7)
    x = np.random.default_rng(8).standard_normal((7, shape[1])).astype(np.float32)
    np.testing.assert_allclose(
        int4.matmul(int4.repack(data, tensor_type, shape), x), x @ expected.T, rtol=1e-4, atol=1e-3
    )


def test_only_four_bit_matrices_of_whole_runs_are_held_as_nibbles():
    assert int4.fits(GGMLType.Q4_K, (8, 256)) and int4.fits(GGMLType.Q4_0, (8, 64))
    assert not int4.fits(GGMLType.Q4_0, (8, 96))  # 96 values: one and a half runs of 64
    assert not int4.fits(GGMLType.Q5_0, (8, 64)) and not int4.fits(GGMLType.Q8_0, (8, 64))
    with pytest.raises(ValueError):
        int4.repack(np.zeros(8 * 3 * 18, np.uint8), GGMLType.Q4_0, (8, 96))


@pytest.mark.parametrize(
    "rows, blocks_per_row", [(1, 1), (37, 3), (5, 6), (2000, 20)]
)  # odd: a last half step
def test_q5_0_read_in_place_matvec_equals_reference_product(rows, blocks_per_row):
    data, shape, expected = weight(GGMLType.Q5_0, rows, blocks_per_row, seed=21)
    w = blocks.wrap(data, GGMLType.Q5_0, shape)
    assert np.shares_memory(w.blocks, data) and w.in_place
    np.testing.assert_array_equal(w.dequantize(), expected)
    x = np.random.default_rng(22).standard_normal(shape[1]).astype(np.float32)
    assert_close_to_integer_product(w.matvec(x), expected, x)


def test_q5_0_read_in_place_matmul_equals_reference_product_across_tiles(monkeypatch):
    monkeypatch.setattr(int8, "PREFILL_TILE_ROWS", 16)
    data, shape, expected = weight(GGMLType.Q5_0, 45, 4, seed=23)
    x = np.random.default_rng(24).standard_normal((7, shape[1])).astype(np.float32)
    np.testing.assert_allclose(
        blocks.wrap(data, GGMLType.Q5_0, shape).matmul(x), x @ expected.T, rtol=1e-4, atol=1e-3
    )


def test_only_q8_0_and_q5_0_matrices_are_read_as_blocks():
    assert blocks.fits(GGMLType.Q5_0, (8, 96)) and blocks.fits(GGMLType.Q8_0, (8, 96))
    assert not blocks.fits(GGMLType.Q4_0, (8, 64)) and not blocks.fits(GGMLType.Q5_0, (96,))
    with pytest.raises(ValueError, match="not a Q8_0 or Q5_0 matrix"):
        blocks.wrap(random_blocks(GGMLType.Q4_0, 2), GGMLType.Q4_0, (2, 32))


def test_stacked_block_matrices_are_a_copy_whose_rows_give_each_part_and_need_one_type():
    parts = [weight(GGMLType.Q5_0, rows, 2, seed=25 + rows) for rows in (3, 5)]
    stacked = blocks.BlockWeight.stack([blocks.wrap(data, GGMLType.Q5_0, shape) for data, shape, _ in parts])
    assert not stacked.in_place and stacked.shape == (8, 64)
    np.testing.assert_array_equal(stacked.rows(3, 8).dequantize(), parts[1][2])
    other_width, other_type = weight(GGMLType.Q5_0, 2, 4), weight(GGMLType.Q8_0, 2, 2)
    first = blocks.wrap(parts[0][0], GGMLType.Q5_0, parts[0][1])
    assert (
        blocks.BlockWeight.stack([first, blocks.wrap(other_width[0], GGMLType.Q5_0, other_width[1])]) is None
    )
    assert blocks.BlockWeight.stack([first, blocks.wrap(other_type[0], GGMLType.Q8_0, other_type[1])]) is None


HOST = isa.host_features()


@pytest.mark.parametrize("path", isa.ISAS)
def test_integer_dot_products_of_each_instruction_set_equal_the_reference(path):
    """Every layout's dot product built for each path this CPU executes (the others are
    compile-tested only, below), on random blocks including the extremes (-128 and 127 bytes)."""
    if not isa.runs(HOST, path):
        pytest.skip(
            f"this CPU cannot execute {path}: compile-tested only "
            "(test_each_instruction_set_compiles_to_its_dot_product_instruction)"
        )
    from numba import njit

    nibble_dot, q5_0_dot, q8_0_dot, int8_dot16, int8_dot32 = intdot._intrinsics(path)

    @njit
    def nibble_rows(packed, scale, offset, xq, xd, x_sums, out):
        for r in range(packed.shape[0]):
            out[r] = nibble_dot(packed[r], scale[r], offset[r], xq, xd, x_sums)

    @njit
    def block_rows(blocks, q5, xq, xd, xq4, out):
        for r in range(blocks.shape[0]):
            out[r] = q5_0_dot(blocks[r], xq, xd, xq4) if q5 else q8_0_dot(blocks[r], xq, xd, xq4)

    @njit
    def int8_rows(q, scale, sub, xq, xd, xq4, out):
        for r in range(q.shape[0]):
            if sub == 16:
                out[r] = int8_dot16(q[r], scale[r], xq, xd, xq4)
            else:
                out[r] = int8_dot32(q[r], scale[r], xq, xd, xq4)

    x = np.random.default_rng(26).standard_normal(288).astype(np.float32)  # 9 blocks: a last half step
    x[5] = 40.0  # a block whose largest value rounds to 127 exactly
    xq, xd, x_sums, xq4 = intdot.quantize(x)
    for tensor_type in (GGMLType.Q4_0, GGMLType.Q4_1):
        data, shape, expected = weight(tensor_type, 9, 8, seed=27)
        w, out = int4.repack(data, tensor_type, shape), np.empty(9, np.float32)
        nibble_rows(w.packed, w.scale, w.offset, xq[:256], xd[:8], x_sums[:8], out)
        offsets = np.repeat(w.offset, 32, axis=1)
        scaled = int4.dequantize(int4.Int4Weight(w.packed, w.scale, np.zeros_like(w.offset)))
        assert_close_to_integer_product(out, scaled, x[:256], offsets)
    for tensor_type in (GGMLType.Q5_0, GGMLType.Q8_0):
        data, shape, expected = weight(tensor_type, 9, 9, seed=28)
        if tensor_type == GGMLType.Q8_0:  # the largest products: -128 and 127 weights against 127 activations
            data.reshape(9, 9, 34)[0, :, 2:] = np.array([-128, 127] * 16, np.int8).view(np.uint8)
            expected = dequantize(data, tensor_type, shape)
        block_rows(
            blocks.wrap(data, tensor_type, shape).blocks, tensor_type == GGMLType.Q5_0, xq, xd, xq4, out
        )
        assert_close_to_integer_product(out, expected, x)
    for tensor_type, n_blocks in (
        (GGMLType.Q5_0, 9),
        (GGMLType.Q6_K, 1),
        (GGMLType.Q8_0, 9),
    ):  # 32, 16, 32 a scale
        data, shape, expected = weight(tensor_type, 9, n_blocks, seed=30)
        w = int8.repack(data, tensor_type, shape)
        if tensor_type == GGMLType.Q8_0:
            w.q[0] = np.array([-128, 127] * (shape[1] // 2), np.int8)
            expected = int8.dequantize(w)
        int8_rows(w.q, w.scale, w.sub, xq[: shape[1]], xd[: shape[1] // 32], xq4[: shape[1] // 4], out)
        assert_close_to_integer_product(out, expected, x[: shape[1]])


# target triple, CPU, features, the instruction each path must use
TARGETS = {
    "avx512vnni": ("x86_64-unknown-linux-gnu", "icelake-server", "", "vpdpbusd"),
    "avxvnni": ("x86_64-unknown-linux-gnu", "alderlake", "", "vpdpbusd"),
    "avx2": ("x86_64-unknown-linux-gnu", "haswell", "", "vpmaddubsw"),
    "i8mm": ("aarch64-unknown-linux-gnu", "", "+neon,+dotprod,+i8mm", "usdot"),
    "dotprod": ("aarch64-unknown-linux-gnu", "", "+neon,+dotprod", "sdot"),
}


@pytest.mark.parametrize("path", list(TARGETS))
def test_each_instruction_set_compiles_to_its_dot_product_instruction(path):
    """The paths a machine may not run (ARM on x86, AVX-512 on AVX2) are compiled for their own
    target through llvmlite; each of the five layouts' functions must use the instruction."""
    triple, cpu, features, instruction = TARGETS[path]
    functions = re.split(r"\n(?=\w+:)", intdot.assembly(path, triple, cpu, features))
    bodies = {name: next(f for f in functions if f.startswith(name + ":")) for name in intdot.LAYOUTS}
    for name, body in bodies.items():
        assert re.search(rf"\b{instruction}\b", body), f"{path} {name}: no {instruction}"
    if path == "avxvnni":  # the VEX (256-bit) form, not the EVEX one of AVX-512
        assert "zmm" not in "".join(bodies.values())


@pytest.mark.parametrize(
    "features, expected",
    [
        (
            {
                "avx512vnni": True,
                "avx512bw": True,
                "avx512f": True,
                "avx512vl": True,
                "avx2": True,
                "avxvnni": False,
            },
            "avx512vnni",
        ),
        ({"avxvnni": True, "avx2": True, "avx512f": False}, "avxvnni"),
        ({"avx2": True, "fma": True, "avx512f": False, "avxvnni": False}, "avx2"),
        ({"avx": True, "sse4.2": True}, "portable"),
        ({"neon": True, "dotprod": True, "i8mm": True}, "i8mm"),
        ({"dotprod": True}, "dotprod"),
        ({"neon": True}, "portable"),
        ({}, "portable"),
    ],
)
def test_the_dispatcher_picks_the_best_path_for_a_feature_set(features, expected):
    assert isa.choose(features) == expected


def test_a_forced_path_must_be_one_this_cpu_runs(monkeypatch):
    monkeypatch.setenv(isa.ENV, "portable")
    assert isa.selected() == "portable"
    monkeypatch.setenv(isa.ENV, "sse9")
    with pytest.raises(InvalidOptionError, match="not a known path"):
        isa.selected()
    missing = next((p for p in isa.ISAS if not isa.runs(HOST, p)), None)
    if missing:
        monkeypatch.setenv(isa.ENV, missing)
        with pytest.raises(InvalidOptionError, match="this CPU lacks"):
            isa.selected()


def q8_0_matrix(rows, blocks_per_row, seed):
    data, shape, expected = weight(GGMLType.Q8_0, rows, blocks_per_row, seed)
    return blocks.wrap(data, GGMLType.Q8_0, shape), expected


@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (37, 3), (130, 2), (2000, 20)])
def test_q8_0_read_in_place_matvec_equals_reference_product(rows, blocks_per_row):
    w, expected = q8_0_matrix(rows, blocks_per_row, seed=9)
    x = np.random.default_rng(10).standard_normal(w.shape[1]).astype(np.float32)
    assert_close_to_integer_product(w.matvec(x), expected, x)
    np.testing.assert_array_equal(w.dequantize(), expected)


def test_q8_0_read_in_place_matmul_equals_reference_product_across_tiles(monkeypatch):
    monkeypatch.setattr(int8, "PREFILL_TILE_ROWS", 16)
    w, expected = q8_0_matrix(45, 2, seed=11)
    x = np.random.default_rng(12).standard_normal((7, w.shape[1])).astype(np.float32)
    np.testing.assert_allclose(w.matmul(x), x @ expected.T, rtol=1e-4, atol=1e-3)


def test_q8_0_matrices_are_views_of_the_file_bytes():
    data, shape, _ = weight(GGMLType.Q8_0, 4, 2, seed=13)
    assert np.shares_memory(blocks.wrap(data, GGMLType.Q8_0, shape).blocks, data)


@pytest.mark.parametrize(
    "n_heads, n_kv, S, T, window, softcap, alibi",
    [
        (9, 3, 620, 1, 0, 0.0, False),  # SmolLM2's grouping, many chunks
        (4, 1, 700, 2, 512, 0.0, False),  # Gemma 3's, a window shorter than the keys
        (8, 8, 33, 3, 0, 30.0, False),  # fewer keys than a chunk, softcap
        (4, 2, 100, 4, 0, 0.0, True),  # ALiBi
        (9, 3, 300, 300, 0, 0.0, False),  # a prompt: BLAS products, the numba softmax
        (4, 1, 300, 120, 64, 50.0, True),  # a prompt with window, softcap and ALiBi
    ],
)
def test_attention_kernels_equal_the_numpy_path(n_heads, n_kv, S, T, window, softcap, alibi):
    """The numba kernels against the numpy path run in float64: no further off than the numpy
    path itself in float32."""
    from pocketlm.backends.cpu import CpuBackend

    rng = np.random.default_rng(14)
    q = rng.standard_normal((T, n_heads, 64)).astype(np.float32)
    k = rng.standard_normal((S, n_kv, 64)).astype(np.float32)
    v = rng.standard_normal((S, n_kv, 48)).astype(np.float32)
    k_pos = np.arange(S, dtype=np.int64)
    k_pos[S // 3 : S // 3 + 5] = -1  # empty ring slots are masked
    q_pos = np.arange(S - T, S, dtype=np.int64)
    slopes = rng.random(n_heads).astype(np.float32) if alibi else None
    fast = CpuBackend(fast=True).attention(
        q, k, v, q_pos, k_pos, 0.125, window or None, softcap or None, slopes
    )
    numpy32 = CpuBackend(fast=False).attention(
        q, k, v, q_pos, k_pos, 0.125, window or None, softcap or None, slopes
    )
    exact = CpuBackend(fast=False).attention(
        *(a.astype(np.float64) for a in (q, k, v)),
        q_pos,
        k_pos,
        0.125,
        window or None,
        softcap or None,
        None if slopes is None else slopes.astype(np.float64),
    )
    assert fast.dtype == np.float32
    assert np.abs(fast - exact).max() <= 1.5 * np.abs(numpy32 - exact).max() + 1e-6


@pytest.mark.parametrize(
    "n_heads, n_kv, S, T, head_dim, value_dim, window, softcap, alibi",
    [
        (9, 3, 620, 1, 64, 64, 0, 0.0, False),  # SmolLM2's shapes
        (4, 1, 301, 2, 256, 256, 0, 0.0, False),  # Gemma 3's: wide heads, keys not a multiple of 8
        (8, 2, 77, 3, 80, 40, 0, 0.0, False),  # Phi-2's head width: value runs of 32 and a last vector of 8
        (4, 2, 520, 1, 64, 64, 0, 0.0, False),  # 16 chunks of 40 keys: the last three empty
        (4, 1, 700, 2, 64, 64, 512, 30.0, True),  # a window shorter than the keys, soft-capping, ALiBi
    ],
)
def test_attention_kernels_read_a_float16_cache_as_the_values_it_rounds_to(
    n_heads, n_kv, S, T, head_dim, value_dim, window, softcap, alibi
):
    """The decode kernels on float16 keys and values (`kv_cache="f16"`) give what
    the numpy path gives on those values widened to float32, as closely as on a float32 cache."""
    from pocketlm.backends.cpu import CpuBackend

    rng = np.random.default_rng(15)
    q = rng.standard_normal((T, n_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((S, n_kv, head_dim)).astype(np.float16)
    v = rng.standard_normal((S, n_kv, value_dim)).astype(np.float16)
    k_pos, q_pos = np.arange(S, dtype=np.int64), np.arange(S - T, S, dtype=np.int64)
    k_pos[S // 3 : S // 3 + 5] = -1  # empty ring slots are masked
    slopes = rng.random(n_heads).astype(np.float32) if alibi else None
    options = (0.125, window or None, softcap or None)
    fast = CpuBackend(fast=True).attention(q, k, v, q_pos, k_pos, *options, slopes)
    widened = (k.astype(np.float32), v.astype(np.float32))
    on_float32 = CpuBackend(fast=True).attention(q, *widened, q_pos, k_pos, *options, slopes)
    wide = (a.astype(np.float64) for a in (q, *widened))
    exact = CpuBackend(fast=False).attention(
        *wide, q_pos, k_pos, *options, None if slopes is None else slopes.astype(np.float64)
    )
    assert fast.dtype == np.float32
    assert np.abs(fast - exact).max() <= 1.5 * np.abs(on_float32 - exact).max() + 1e-6


def test_attention_of_heads_the_decode_kernels_cannot_take_runs_on_the_general_path():
    """Heads whose width is not a multiple of 8 (tiny test configs) still attend, on a float16 cache too."""
    from pocketlm.backends.cpu import CpuBackend

    rng = np.random.default_rng(16)
    q = rng.standard_normal((1, 4, 12)).astype(np.float32)
    k, v = (rng.standard_normal((40, 2, 12)).astype(np.float16) for _ in range(2))
    args = (np.array([39]), np.arange(40), 0.3)
    fast = CpuBackend(fast=True).attention(q, k, v, *args)
    reference = CpuBackend(fast=False).attention(q, k.astype(np.float32), v.astype(np.float32), *args)
    np.testing.assert_allclose(fast, reference, atol=1e-6)


# target triple, CPU, features, the instructions that widen float16 and multiply-add
ATTENTION_TARGETS = {
    "avx2": ("x86_64-unknown-linux-gnu", "haswell", "", "vcvtph2ps", "vfmadd"),
    "avx512": ("x86_64-unknown-linux-gnu", "icelake-server", "", "vcvtph2ps", "vfmadd"),
    "neon": ("aarch64-unknown-linux-gnu", "", "+neon", "fcvtl", "fmla"),
}


@pytest.mark.parametrize("target", list(ATTENTION_TARGETS))
def test_decode_attention_loops_compile_to_vector_multiply_adds_on_each_target(target):
    """The attention loops are plain vector IR: compiled for x86 and ARM, both multiply-add in
    vector registers, and on a float16 cache widen 8 values with the target's instruction."""
    triple, cpu, features, widen, fma = ATTENTION_TARGETS[target]
    for half in (False, True):
        code = attention.assembly(half, triple, cpu, features)
        functions = re.split(r"\n(?=\w+:)", code)
        for name in ("key_scores", "add_weighted_values"):
            body = next(f for f in functions if f.startswith(name + ":"))
            assert re.search(rf"\b{fma}", body), f"{target} {name}: no {fma}"
            assert bool(re.search(rf"\b{widen}", body)) == half, f"{target} {name} half={half}"


def test_cpu_kv_cache_holds_float16_by_default_and_float32_on_request():
    from pocketlm.backends.cpu import CpuBackend

    half = CpuBackend().layer_cache(100, 2, 64, 64, None)
    full = CpuBackend(kv_cache="f32").layer_cache(100, 2, 64, 64, None)
    reference = CpuBackend(fast=False).layer_cache(100, 2, 64, 64, None)
    assert half.keys.dtype == half.values.dtype == np.float16
    assert full.keys.dtype == reference.keys.dtype == np.float32
    assert half.nbytes * 2 == full.nbytes
    with pytest.raises(InvalidOptionError, match="kv_cache 'f8'"):
        CpuBackend(kv_cache="f8")


def test_vectorisable_exp_is_within_float32_rounding_of_exp():
    from numba import njit

    from pocketlm.kernels.vecmath import exp_nonpositive

    @njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_nonpositive(x[i])

    x = np.concatenate([-np.logspace(-8, np.log10(87), 100_000), [0.0, -np.inf, -87.5, -1000.0]]).astype(
        np.float32
    )
    ours = np.empty_like(x)
    exp_all(x, ours)
    exact = np.exp(x.astype(np.float64))
    kept = x >= -87
    assert np.all(np.abs(ours - exact)[kept] <= 3e-7 * exact[kept])  # a few float32 ulps
    assert list(ours[-3:]) == [0.0, 0.0, 0.0]  # -inf (masked keys) and below e^-87 give 0


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("T, n_dims", [(1, 64), (5, 32)])  # 32 of 64: partial rotation (Phi, StableLM)
def test_rope_kernel_equals_the_numpy_rotation(neox, T, n_dims):
    from pocketlm.backends.cpu import CpuBackend

    x = np.random.default_rng(15).standard_normal((T, 3, 64)).astype(np.float32)
    positions = np.arange(100, 100 + T)
    args = (x, positions, 10000.0, n_dims, neox, 1.0, None)
    np.testing.assert_allclose(
        CpuBackend(fast=True).rope(*args), CpuBackend(fast=False).rope(*args), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("size", [7, 3 * (1 << 16) + 5])  # one row (decode), and split over threads
def test_silu_and_gelu_kernels_equal_the_exact_functions(size):
    """Against float64: within a few float32 ulps (the numpy formula in float32 loses more where
    0.5 (1 + tanh(u)) cancels, far left of zero)."""
    from pocketlm.backends.cpu import CpuBackend

    x = (np.random.default_rng(16).standard_normal(size) * 4).astype(np.float32)
    x[:4] = [0.0, -100.0, 100.0, -9.0]
    fast, x64 = CpuBackend(fast=True), x.astype(np.float64).reshape(-1, 1)

    def x_sigmoid(z):  # x * sigmoid(z) = 0.5 x (1 + tanh(z / 2)), without cancellation
        e = np.exp(-np.abs(z))
        return x64 * np.where(z >= 0, 1.0, e) / (1.0 + e)

    for name, z in {"silu": x64, "gelu_tanh": 2 * np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)}.items():
        ours, expected = getattr(fast, name)(x.reshape(-1, 1)), x_sigmoid(z)
        assert ours.shape == expected.shape and ours.dtype == np.float32
        # a few ulps, plus z's own rounding in float32 (e^z's relative error is z's absolute
        # one; z = k (x + c x^3) takes 4 roundings: 4 ulps = 5e-7 |z|); e^z below e^-87
        # (1.6e-38, float32's smallest normal numbers) flushes to 0, times |x|
        tolerance = (1e-6 + 5e-7 * np.abs(z)) * np.abs(expected) + 1.7e-38 * np.maximum(1, np.abs(x64))
        assert np.all(np.abs(ours - expected) <= tolerance), name


def test_the_engine_reads_q8_0_matrices_from_a_resident_copy_of_their_bytes(tiny, tmp_path):
    """Not through the file's mapping (4 KB pages; see CpuBackend._resident), counted once."""
    from pocketlm import ConversionConfig, convert, load

    _, folder, _ = tiny("llama")
    lm = load(convert(folder, tmp_path / "q8_0.gguf", ConversionConfig(quant="q8_0"), progress=False))
    matrices = [t for t in lm.file.tensors.values() if t.type == GGMLType.Q8_0 and len(t.shape) == 2]
    assert matrices
    for t in matrices:
        blocks = lm.ops.packed(t).blocks
        assert not np.shares_memory(blocks, lm.file.tensors[t.name].data)
        np.testing.assert_array_equal(blocks.view(np.uint8).ravel(), t.data.ravel())
    assert lm.ops.weight_bytes == sum(
        p.nbytes for p in [*lm.ops._packed.values(), *lm.ops._dequantized.values()]
    )


@pytest.mark.parametrize("arch, quant", [("llama", "q8_0"), ("gemma3", "q4_1"), ("gemma4", "q4_0")])
def test_a_loaded_model_runs_prompts_and_tokens_with_only_kernels_loaded_before_its_weights(
    tiny, tmp_path, arch, quant
):
    """`CpuBackend.load_kernels` (before the weights are repacked) loads every kernel a prompt and
    a token then call: loaded later, each would page LLVM's code back in on top of the weights.
    In a child process, whose kernels start unloaded."""
    import subprocess
    import sys

    from pocketlm import ConversionConfig, convert

    _, folder, _ = tiny(arch)
    path = convert(folder, tmp_path / f"{quant}.gguf", ConversionConfig(quant=quant), progress=False)
    code = """if True:
        import importlib, pkgutil, sys
        import numba, pocketlm
        from pocketlm import kernels, load
        from pocketlm.backends.cpu import CpuBackend
        from pocketlm.engine import decode_step, prefill

        def loaded():
            modules = [importlib.import_module(f"pocketlm.kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
            return {
                (m.__name__, name, str(signature))
                for m in modules
                for name, f in vars(m).items()
                if isinstance(f, numba.core.registry.CPUDispatcher)
                for signature in f.signatures
            }

        before_weights = []
        original = CpuBackend.load_kernels
        def load_kernels(self, types):
            original(self, types)
            before_weights.append(loaded())
        CpuBackend.load_kernels = load_kernels
        lm = load(sys.argv[1])
        cache = lm.make_cache(64)
        prefill(lm, cache, list(range(3, 40)))
        decode_step(lm, cache, 5)
        print(len(before_weights[0]), sorted(loaded() - before_weights[0]))
    """
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    count, later = run.stdout.split(" ", 1)
    assert int(count) >= 8 and later.strip() == "[]", run.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_the_code_pages_llvm_holds_resident_are_let_go_and_llvm_still_compiles():
    import subprocess
    import sys

    code = """if True:
        import numpy as np, pocketlm
        from numba import njit
        from pocketlm.kernels.memory import release_code_pages

        @njit
        def twice(x):
            return 2 * x

        assert twice(np.arange(3.0)).tolist() == [0.0, 2.0, 4.0]  # LLVM at work: its pages in memory
        first, second = release_code_pages(), release_code_pages()

        @njit
        def thrice(x):
            return 3 * x

        assert thrice(np.arange(3.0)).tolist() == [0.0, 3.0, 6.0]  # paged back in as needed
        print(first, second)
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = map(int, run.stdout.split())
    assert first > 20 << 20 and second < first // 4


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
def test_a_row_prefetch_requests_each_line_without_dividing():
    """`memory.prefetch_row` once divided by the item size at run time, twice an array and row,
    which cost the 576-wide matvecs a third of their time with the rows in cache."""
    import re

    from numba import njit

    from pocketlm.kernels.memory import prefetch_row

    @njit
    def request(matrix, r, ahead):
        prefetch_row(matrix, r, ahead)

    matrix = np.zeros((4, 100), np.float32)
    for r, ahead in ((0, 1), (3, 1), (0, 0), (3, -2)):  # a row past the end, none, backwards: nothing
        request(matrix, r, ahead)
    code = request.inspect_asm(request.signatures[0])
    assert "prefetcht0" in code and not re.search(r"\bi?div[lq]?\b", code)


def test_importing_pocketlm_shortens_the_idle_spin_of_openmp_and_openblas_threads_unless_set():
    """Both are read when their libraries load, so pocketlm sets them before it imports numpy;
    a value the user set is kept."""
    import subprocess
    import sys

    code = "import os, pocketlm; print(os.environ['OPENBLAS_THREAD_TIMEOUT'], os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True)
    assert run(env=env, check=True).stdout.split() == ["4", "20000"]
    assert run(env=env | {"OPENBLAS_THREAD_TIMEOUT": "28"}, check=True).stdout.split() == ["28", "20000"]


OPENBLAS_SPIN_AFTER_IMPORT = """
import ctypes, sys
if sys.argv[1] == "numpy first":
    import numpy
import pocketlm
import numpy as np
import threadpoolctl

info = [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
if not info or info[0]["threading_layer"] != "pthreads":
    print("no pthreads OpenBLAS")
    raise SystemExit
library = ctypes.CDLL(info[0]["filepath"])
a = np.ones((300, 300), np.float32)
assert (a @ a)[0, 0] == 300  # the thread pool, restarted, multiplies as before
info = [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
print(library.openblas_thread_timeout(), info[0]["num_threads"], pocketlm.threads.BLAS_SPIN_SHORT)
"""


def test_openblas_threads_spin_briefly_whether_numpy_or_pocketlm_was_imported_first():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when numpy loads it; with numpy imported first,
    pocketlm has it read its settings again and restarts its thread pool, so its threads spin
    briefly either way, as many as before (and so the same products); a value the user set is kept."""
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS")
    }
    env["OPENBLAS_NUM_THREADS"] = "2"  # the count whatever this machine's cores (BLAS's own default)

    def seen(order, **extra):
        run = subprocess.run(
            [sys.executable, "-c", OPENBLAS_SPIN_AFTER_IMPORT, order],
            capture_output=True,
            text=True,
            env=env | extra,
            check=True,
        )
        if "no pthreads OpenBLAS" in run.stdout:
            pytest.skip("numpy's BLAS here is not OpenBLAS with its own threads")
        return run.stdout.split()

    assert seen("numpy first") == ["4", "2", "True"]
    assert seen("pocketlm first") == ["4", "2", "True"]
    assert seen("numpy first", OPENBLAS_THREAD_TIMEOUT="28") == ["28", "2", "True"]


# -- prompt products in integers (kernels.intgemm) ------------------------------------------------


def kernel_weight(tensor_type, data, shape):
    """A quantized matrix held as the cpu backend holds it (`CpuBackend.packed`)."""
    if blocks.fits(tensor_type, shape):
        return blocks.wrap(data, tensor_type, shape)
    if int4.fits(tensor_type, shape):
        return int4.repack(data, tensor_type, shape)
    return int8.repack(data, tensor_type, shape)


def scaled_and_offsets(w):
    """A kernel weight's scaled integer parts and its offsets, as float matrices."""
    if isinstance(w, blocks.BlockWeight):
        return w.dequantize(), None
    if isinstance(w, int4.Int4Weight):
        plain = int4.Int4Weight(w.packed, w.scale, np.zeros_like(w.offset))
        return int4.dequantize(plain), np.repeat(w.offset, 32, axis=1)
    plain = int8.Int8Weight(w.q, w.scale, np.zeros_like(w.offset), w.sub)
    return int8.dequantize(plain), np.repeat(w.offset, w.sub, axis=1) if w.offset.shape[1] else None


def check_prompt_products():
    """`intgemm.matmul` on this process's path, for every quantized type as the backend holds it:
    each token's row equals the weights' scaled parts times that token quantized as decode
    quantizes it, plus the offsets times the exact token (to float rounding). 13 tokens (not a
    whole number of the micro-kernel's tokens) and 70 or 40 rows (not whole panels)."""
    from pocketlm.kernels import intgemm

    rng = np.random.default_rng(40)
    for tensor_type in QUANTIZED:
        block_size, _ = BLOCK_LAYOUT[tensor_type]
        rows, n_blocks = (40, 1) if block_size == 256 else (70, 4)
        data, shape, _ = weight(tensor_type, rows, n_blocks, seed=41)
        if tensor_type == GGMLType.Q8_0:  # the largest products: -128 and 127 weights
            data.reshape(rows, n_blocks, 34)[0, :, 2:] = np.array([-128, 127] * 16, np.int8).view(np.uint8)
        w = kernel_weight(tensor_type, data, shape)
        assert intgemm.supports(w), tensor_type.name
        x = (rng.standard_normal((13, shape[1])) * rng.uniform(0.1, 30, (13, 1))).astype(np.float32)
        x[2, :32] = 0.0  # a block of zeros
        x[3, 5] = 200.0  # a block whose largest value rounds to 127 exactly
        y = intgemm.matmul(w, x)
        assert y.shape == (13, rows) and y.flags.c_contiguous, tensor_type.name
        scaled, offsets = scaled_and_offsets(w)
        for t in range(13):
            assert_close_to_integer_product(y[t], scaled, x[t], offsets)


@pytest.mark.parametrize("path", ["avx512vnni", "avxvnni", "avx2", "i8mm", "dotprod", "portable"])
def test_prompt_products_in_integers_of_each_path_equal_the_integer_reference(path):
    """The path this process was built with is checked here; another path this CPU runs, in a
    child process that forces it ($POCKETLM_CPU_ISA); the others are compile-tested below. The
    portable path (which any CPU runs) runs the ARM paths' panel layout and shapes with plain
    vectors in place of `sdot`."""
    import subprocess
    import sys

    from pocketlm.kernels import intgemm

    if path == intgemm.ISA:
        check_prompt_products()
        return
    if not isa.runs(HOST, path):
        pytest.skip(f"this CPU cannot execute {path}: compile-tested only")
    code = "import pocketlm, test_kernels; test_kernels.check_prompt_products(); print('ok')"
    tests = os.path.dirname(__file__)
    env = os.environ | {isa.ENV: path, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tests)
    assert run.returncode == 0 and run.stdout.split()[-1:] == ["ok"], run.stderr[-3000:]


@pytest.mark.parametrize(
    "path, cpu, instruction",
    [
        ("avx512vnni", "icelake-server", "vpdpbusd"),
        ("avxvnni", "alderlake", "vpdpbusd"),
        ("avx2", "haswell", "vpmaddubsw"),
    ],
)
def test_prompt_micro_kernels_compile_to_the_byte_dot_product_with_their_sums_in_registers(
    path, cpu, instruction
):
    """Each x86 path's micro-kernels (runs of 16 and 32, with and without offsets) use its
    instruction, 256-bit registers where the path has them, and never spill a vector to the stack."""
    from pocketlm.kernels import intgemm

    text = intgemm.assembly(path, "x86_64-unknown-linux-gnu", cpu)
    functions = re.split(r"\n(?=\w+:)", text)
    for name in intgemm.NAMES:
        body = next(f for f in functions if f.startswith(name + ":"))
        assert re.search(rf"\b{instruction}\b", body), f"{path} {name}: no {instruction}"
        assert ("zmm" in body) == (path == "avx512vnni"), f"{path} {name}: register width"
        spills = re.findall(r"vmov\w+\s+%[xyz]mm\d+, -?\d*\(%rsp\)", body)
        assert not spills, f"{path} {name}: {len(spills)} vector spills"


@pytest.mark.parametrize(
    "path, features, instruction", [("dotprod", "+neon,+dotprod", "sdot"), ("i8mm", "+neon,+i8mm", "usdot")]
)
def test_arm_prompt_micro_kernels_compile_to_their_dot_product_with_their_sums_in_registers(
    path, features, instruction
):
    """ARM cannot run here: each micro-kernel, compiled for AArch64, multiplies with its path's
    instruction (I8MM's `usdot` needs no DotProd) and never stores a vector register to the stack
    (callee-saved d8-d15 are saved on entry, by rule)."""
    from pocketlm.kernels import intgemm

    text = intgemm.assembly(path, "aarch64-unknown-linux-gnu", "", features)
    functions = re.split(r"\n(?=\w+:)", text)
    for name in intgemm.NAMES:
        body = next(f for f in functions if f.startswith(name + ":"))
        lanes, mr, nr = intgemm.SHAPES[path]
        assert (
            len(re.findall(rf"\b{instruction}\b", body)) == mr * nr * (16 if name == "run16" else 32) // 4
        ), name
        spills = re.findall(r"\bst[rp]\s+q\d+.*\[sp", body)
        assert not spills, f"{path} {name}: {len(spills)} vector spills"


def test_the_backend_multiplies_prompts_in_integers_unless_asked_for_float32(monkeypatch):
    """The default prefill rounds activations as decode does; "f32" keeps the exact BLAS product;
    any other value is refused in one line."""
    from pocketlm.backends.cpu import CpuBackend
    from pocketlm.kernels import intgemm

    data, shape, expected = weight(GGMLType.Q4_1, 64, 4, seed=42)
    x = np.random.default_rng(43).standard_normal((9, shape[1])).astype(np.float32)
    w = kernel_weight(GGMLType.Q4_1, data, shape)
    integer, exact = CpuBackend(), CpuBackend(prefill="f32")
    for backend in (integer, exact):
        monkeypatch.setitem(backend._packed, "w", w)
    tensor = type("T", (), {"name": "w", "shape": shape, "type": GGMLType.Q4_1})()
    if intgemm.available():
        np.testing.assert_array_equal(integer.linear(x, tensor), intgemm.matmul(w, x))
    np.testing.assert_allclose(exact.linear(x, tensor), x @ expected.T, rtol=1e-4, atol=1e-3)
    with pytest.raises(InvalidOptionError, match="prefill 'int4': choose one of int8, f32"):
        CpuBackend(prefill="int4")
