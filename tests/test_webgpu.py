"""The WebGPU backend (wgpu-py; on this machine Mesa's llvmpipe/lavapipe, a CPU implementation):
each kernel against the CPU backend's numpy reference, then whole models against the CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, prompt_ids, random_blocks
from test_parity_transformers import our_greedy as greedy

from pocketlm import LlmInference, load
from pocketlm.backends.cpu import CpuBackend
from pocketlm.engine import decode_step, prefill
from pocketlm.errors import UnsupportedError
from pocketlm.formats.gguf import Tensor
from pocketlm.formats.quants import BLOCK_LAYOUT, GGMLType

wgpu = pytest.importorskip("wgpu")


def tiny_on_gpu(tiny, arch: str):
    """A tiny random model of `arch` loaded on the webgpu backend: (its config's model, path, lm)."""
    model, _, path = tiny(arch)
    try:
        return model, path, load(path, backend="webgpu")
    except UnsupportedError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gpu():
    from pocketlm.backends.webgpu import WebGPUBackend

    try:
        ops = WebGPUBackend()
    except UnsupportedError as e:
        pytest.skip(str(e))
    ops.max_positions = 256
    print(f"\nWebGPU adapter: {ops.device.description}")
    return ops


def test_the_cut_cffi_preamble_parses_types_as_cffi_itself_does():
    """Device() cuts cffi's typedef preamble to the names a parsed text holds (2 s of start-up):
    types, sizes and function types come out as with cffi's own parser."""
    from cffi import FFI, cparser

    from pocketlm.backends.webgpu.device import _quick_cffi_types

    _quick_cffi_types()
    header = (
        "typedef int Width; typedef struct { Width a; float b[4]; } Box; typedef Box *BoxRef;"
        "typedef void (*Callback)(Box *, Width); typedef enum { ONE = 1, TWO } Count;"
    )
    names = ["Box *", "BoxRef[2]", "Width", "Callback", "Box", "Count", "int(*)(Width, BoxRef)"]

    def types(ffi):
        ffi.cdef(header)
        return [(ffi.typeof(n).cname, ffi.sizeof(n)) for n in names]

    quick = cparser.Parser._parse
    assert quick.quick
    got = types(FFI())
    cparser.Parser._parse = quick.__wrapped__
    try:
        assert got == types(FFI())
    finally:
        cparser.Parser._parse = quick


REFERENCE = CpuBackend(fast=False)
QUANTIZED = [
    GGMLType.Q8_0,
    GGMLType.Q4_0,
    GGMLType.Q4_1,
    GGMLType.Q5_0,
    GGMLType.Q5_1,
    GGMLType.Q4_K,
    GGMLType.Q5_K,
    GGMLType.Q6_K,
]


def weight(tensor_type, rows: int, cols: int, seed: int = 0, name: str = "w") -> Tensor:
    block_size, type_size = BLOCK_LAYOUT[tensor_type]
    blocks = random_blocks(tensor_type, rows * cols // block_size, seed)
    return Tensor(
        f"{name}-{tensor_type.name}-{rows}x{cols}-{seed}", tensor_type, (rows, cols), blocks.reshape(-1)
    )


def run(gpu, t):
    return gpu.to_host(t)


@pytest.mark.parametrize("tensor_type", [GGMLType.F32, GGMLType.F16, *QUANTIZED])
@pytest.mark.parametrize("T", [1, 3, 11])
def test_linear_matches_the_numpy_reference(gpu, tensor_type, T):
    cols = 256 if tensor_type in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K) else 96
    w = weight(tensor_type, 37, cols, seed=T)  # an odd number of rows: a partly filled workgroup
    x = np.random.default_rng(T).standard_normal((T, cols)).astype(np.float32)
    expected = REFERENCE.linear(x, w)
    ours = run(gpu, gpu.linear(gpu.upload(x), w))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("cols", [1024, 1088, 3072])
@pytest.mark.parametrize("tensor_type", [GGMLType.Q8_0, GGMLType.Q4_1])
def test_one_token_products_of_long_rows_stage_them_in_the_wide_variant(gpu, tensor_type, cols):
    """A one-token product stages its input in workgroup memory: up to 1024 values in the small
    array, beyond that (to 3072) in the +wide variant's."""
    w = weight(tensor_type, 21, cols, seed=cols)
    x = np.random.default_rng(cols).standard_normal((1, cols)).astype(np.float32)
    gpu.device.trace = []
    ours = run(gpu, gpu.linear(gpu.upload(x), w))
    kernels, gpu.device.trace = [t[0] for t in gpu.device.trace], None
    assert kernels == [
        f"linear+{'int8' if tensor_type == GGMLType.Q8_0 else 'int4'}+plain+one"
        + ("+wide" if cols > 1024 else "")
    ]
    expected = REFERENCE.linear(x, w)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_linear_splits_matrices_beyond_the_binding_limit(gpu, monkeypatch):
    monkeypatch.setattr(gpu.device, "max_binding", 64 * 40)  # 40 rows of 64 int8 per chunk
    w = weight(GGMLType.Q8_0, 100, 64, name="split")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert len(gpu.matrix(w).chunks) == 3
    np.testing.assert_allclose(
        run(gpu, gpu.linear(gpu.upload(x), w)), REFERENCE.linear(x, w), rtol=1e-4, atol=1e-4
    )
    ids = np.array([0, 39, 40, 99])
    gpu.device.set_step(0, ids)
    np.testing.assert_array_equal(run(gpu, gpu.embedding(w, ids)), REFERENCE.embedding(w, ids))


@pytest.mark.parametrize("tensor_type", [GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q6_K])
def test_embedding_rows_match_the_numpy_reference(gpu, tensor_type):
    w = weight(tensor_type, 50, 256, name="emb")
    ids = np.array([3, 0, 49, 3, 17])
    np.testing.assert_allclose(
        run(gpu, gpu.embedding(w, ids)), REFERENCE.embedding(w, ids), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_over_rows_and_heads(gpu, with_weight):
    x = np.random.default_rng(1).standard_normal((3, 4, 80)).astype(np.float32)
    w = Tensor(
        f"norm-{with_weight}",
        GGMLType.F32,
        (80,),
        np.random.default_rng(2).standard_normal(80).astype(np.float32).view(np.uint8),
    )
    w = w if with_weight else None
    np.testing.assert_allclose(
        run(gpu, gpu.rms_norm(gpu.upload(x), w, 1e-6)), REFERENCE.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5
    )


def f32_tensor(name: str, values: np.ndarray) -> Tensor:
    values = np.ascontiguousarray(values, np.float32)
    return Tensor(name, GGMLType.F32, values.shape, values.view(np.uint8).ravel())


@pytest.mark.parametrize("per_head, with_bias", [(False, True), (False, False), (True, True)])
def test_layer_norm_over_rows_with_one_weight_or_one_per_head(gpu, per_head, with_bias):
    """Phi / Falcon norm whole rows; StableLM 2 norms each head of q and k with its own weights."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 4, 80)) * 3 + 1).astype(np.float32)
    shape = (4, 80) if per_head else (80,)
    w = f32_tensor(f"ln-w-{per_head}", rng.standard_normal(shape))
    b = f32_tensor(f"ln-b-{per_head}", rng.standard_normal(shape)) if with_bias else None
    np.testing.assert_allclose(
        run(gpu, gpu.layer_norm(gpu.upload(x), w, b, 1e-5)),
        REFERENCE.layer_norm(x, w, b, 1e-5),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_dims", [32, 16])
def test_rope_matches_at_positions_read_from_the_step_buffer(gpu, neox, n_dims):
    x = np.random.default_rng(3).standard_normal((5, 3, 32)).astype(np.float32)
    positions = np.arange(40, 45)
    factors = np.linspace(1, 4, n_dims // 2).astype(np.float32)
    gpu.device.set_step(40, np.zeros(5))
    ours = run(gpu, gpu.rope(gpu.upload(x), positions, 10000.0, n_dims, neox, 0.5, factors))
    np.testing.assert_allclose(
        ours, REFERENCE.rope(x, positions, 10000.0, n_dims, neox, 0.5, factors), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (None, 20.0), (100, 50.0)])
@pytest.mark.parametrize("T", [1, 6, 12])
@pytest.mark.parametrize("D", [64, 80, 320])
def test_attention_over_the_cache_matches_the_reference(gpu, window, softcap, T, D):
    """Keys 0..start+T-1 in the cache; GQA (8 query heads over 2 kv heads); 130 keys span three
    64-key tiles of the online softmax (one workgroup's, or split over workgroups and merged for
    up to 8 queries); heads of 64 and 80 values (4 and 3 key lanes of 16 and 20 threads, 4 threads
    idle) and of 320 (80 groups of 4 values: some threads take two)."""
    rng = np.random.default_rng(4)
    start = 130 - T
    q = rng.standard_normal((T, 8, D)).astype(np.float32)
    k = rng.standard_normal((start + T, 2, D)).astype(np.float32)
    v = rng.standard_normal((start + T, 2, D)).astype(np.float32)
    cache = gpu.layer_cache(256, 2, D, D, window)
    gpu.device.set_step(0, np.zeros(start + T))
    cache.update_and_fetch(gpu.upload(k), gpu.upload(v), 0)
    gpu.to_host(gpu.upload(np.zeros(1)))  # submit the cache writes
    gpu.device.set_step(start, np.zeros(T))
    positions = np.arange(start, start + T)
    keys, values, _ = cache.update_and_fetch(gpu.upload(k[start:]), gpu.upload(v[start:]), start)
    ours = run(gpu, gpu.attention(gpu.upload(q), keys, values, positions, None, 0.125, window, softcap))
    expected = REFERENCE.attention(q, k, v, positions, np.arange(start + T), 0.125, window, softcap)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_alibi_attention_matches_the_reference(gpu):
    """Falcon-RW: no RoPE, a per-head bias growing with the key's position."""
    rng = np.random.default_rng(12)
    T, S, D = 4, 70, 32
    q = rng.standard_normal((T, 4, D)).astype(np.float32)
    k = rng.standard_normal((S, 4, D)).astype(np.float32)
    v = rng.standard_normal((S, 4, D)).astype(np.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    cache = gpu.layer_cache(256, 4, D, D, None)
    gpu.device.set_step(0, np.zeros(S))
    keys, values, _ = cache.update_and_fetch(gpu.upload(k), gpu.upload(v), 0)
    gpu.to_host(gpu.upload(np.zeros(1)))  # submit the cache writes before the step moves
    gpu.device.set_step(S - T, np.zeros(T))
    positions = np.arange(S - T, S)
    ours = run(gpu, gpu.attention(gpu.upload(q), keys, values, positions, None, 0.2, alibi=slopes))
    expected = REFERENCE.attention(q, k, v, positions, np.arange(S), 0.2, alibi=slopes)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["silu", "gelu_tanh", "gelu"])
def test_activations_match(gpu, op):
    x = np.linspace(-30, 30, 1001, dtype=np.float32).reshape(7, 143)
    np.testing.assert_allclose(
        run(gpu, getattr(gpu, op)(gpu.upload(x))), getattr(REFERENCE, op)(x), rtol=1e-5, atol=1e-5
    )


def test_tensor_arithmetic_and_row_views(gpu):
    a = np.random.default_rng(5).standard_normal((4, 10)).astype(np.float32)
    b = np.random.default_rng(6).standard_normal((4, 10)).astype(np.float32)
    ga, gb = gpu.upload(a), gpu.upload(b)
    np.testing.assert_allclose(run(gpu, ga + gb), a + b, rtol=1e-6)
    np.testing.assert_allclose(run(gpu, ga * gb), a * b, rtol=1e-6)
    np.testing.assert_allclose(run(gpu, np.float32(3.0) * ga[-1:]), 3 * a[-1:], rtol=1e-6)
    np.testing.assert_allclose(
        run(gpu, gpu.softcap(ga[1:3].reshape(-1), 0.5)),
        np.tanh(a[1:3].ravel() / 0.5) * 0.5,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("T", [1, 9])
def test_altup_ops_match_the_numpy_reference(gpu, T):
    """Gemma 3n's ops: stream mixing, magnitude matching, Gaussian top-k (both ddofs), joining
    along the first axis, differences, a scalar added, a host vector broadcast over rows."""
    rng = np.random.default_rng(T)
    streams = rng.standard_normal((4, T, 64)).astype(np.float32)
    coefs = rng.standard_normal((T, 12)).astype(np.float32)  # 3 outputs of 4 streams
    rows = (rng.standard_normal((T, 96)) * 3).astype(np.float32)
    scale = rng.standard_normal(64).astype(np.float32)
    g = gpu.upload(streams)
    np.testing.assert_allclose(
        run(gpu, gpu.mix(g, gpu.upload(coefs))), REFERENCE.mix(streams, coefs), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        run(gpu, gpu.match_rms(gpu.upload(rows), g[2])),
        REFERENCE.match_rms(rows, streams[2]),
        rtol=1e-5,
        atol=1e-5,
    )
    for ddof in (0, 1):
        np.testing.assert_allclose(
            run(gpu, gpu.gaussian_topk(gpu.upload(rows), 1.6448, ddof)),
            REFERENCE.gaussian_topk(rows, 1.6448, ddof),
            rtol=1e-5,
            atol=1e-5,
        )
    assert (REFERENCE.gaussian_topk(rows, 1.6448) == 0).mean() > 0.9  # the cut-off does cut
    np.testing.assert_array_equal(run(gpu, gpu.concat([g[:1], g[1:]])), streams)
    np.testing.assert_allclose(run(gpu, g[1:] - g[:3] + 1.0), streams[1:] - streams[:3] + 1.0, rtol=1e-6)
    np.testing.assert_allclose(run(gpu, g[0] * scale), streams[0] * scale, rtol=1e-6)
    np.testing.assert_allclose(run(gpu, g[1:] + g[0]), streams[1:] + streams[0], rtol=1e-6)


def test_a_sum_fused_into_a_pending_norm_leaves_the_norm_for_its_other_readers(gpu):
    """x + norm(y) runs as the norm's kernel with x added; norm(y) read again afterwards is still
    norm(y) (Gemma 3n adds its normed input to LAuReL's output, then attends over it)."""
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((2, 1, 80)).astype(np.float32)
    w = _vector("fused", 80, 3)
    normed = gpu.rms_norm(gpu.upload(y), w, 1e-6)
    total = gpu.upload(x) + normed
    expected = REFERENCE.rms_norm(y, w, 1e-6)
    np.testing.assert_allclose(run(gpu, total), x + expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(gpu, normed), expected, rtol=1e-5, atol=1e-5)


# -- whole models -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_models_match_the_cpu_backend(tiny, gpu, arch):
    model, _, path = tiny(arch)
    ids = prompt_ids(model.config.vocab_size, 64)
    cpu, webgpu = load(path, kv_cache="f32"), load(path, backend="webgpu")  # the GPU's cache is float32
    assert np.abs(webgpu.logits(ids) - cpu.logits(ids)).max() <= 1e-3
    assert greedy(webgpu, ids, 32) == greedy(cpu, ids, 32)


def test_smollm2_greedy_text_equals_the_reference_backend(real_model, gpu):
    """The webgpu kernels multiply float activations, as the reference backend does (the cpu
    backend's decode quantizes them to int8 blocks, `kernels.intdot`, and its text may part)."""
    path = real_model("smollm2-135m")
    reference, webgpu = load(path, backend="reference"), load(path, backend="webgpu")
    ids = reference.tokenizer.encode("The capital of France is")
    assert np.abs(webgpu.logits(ids) - reference.logits(ids)).max() <= 1e-3
    assert greedy(webgpu, ids, 32) == greedy(reference, ids, 32)


def test_sessions_and_clones_run_on_the_gpu(tiny, gpu):
    _, _, path = tiny("gemma3")
    texts = []
    for backend in ("cpu", "webgpu"):
        session = LlmInference(
            path, backend=backend, temperature=0.0, max_tokens=96, use_chat_template=False, kv_cache="f32"
        ).create_session()
        session.add_query_chunk("the river and the")
        first = session.generate_response(max_new_tokens=6)
        twin = session.clone()
        session.add_query_chunk(" sea")
        twin.add_query_chunk(" sea")
        texts.append(
            (first, session.generate_response(max_new_tokens=6), twin.generate_response(max_new_tokens=6))
        )
    assert texts[0] == texts[1] and texts[1][1] == texts[1][2]


def test_models_needing_ops_the_backend_lacks_are_refused_naming_them(tiny, monkeypatch):
    """Asked of the backend's capabilities before the device opens, never by architecture name
    (the webgpu backend has every capability today: here it is made to lack ALiBi)."""
    from pocketlm.backends.base import ALIBI
    from pocketlm.backends.webgpu import WebGPUBackend

    monkeypatch.setattr(WebGPUBackend, "capabilities", WebGPUBackend.capabilities - {ALIBI})
    _, _, path = tiny("falcon-rw")
    with pytest.raises(
        UnsupportedError, match="the webgpu backend cannot run this falcon model: it has no alibi "
    ):
        load(path, backend="webgpu")


def test_gemma3_270m_matches_the_cpu_backend_with_its_embedding_split_by_rows(real_model, gpu):
    """Its 262144 x 640 embedding (168 MB as int8) exceeds lavapipe's 128 MB binding limit."""
    path = real_model("gemma3-270m")
    # the GPU's cache holds float32, and its products take float32 activations
    cpu, webgpu = load(path, kv_cache="f32", prefill="f32"), load(path, backend="webgpu")
    if webgpu.ops.device.max_binding < 262144 * 640:
        assert len(webgpu.ops.matrix(webgpu.file.tensors["token_embd.weight"]).chunks) > 1
    ids = cpu.tokenizer.encode("The capital of France is")
    assert np.abs(webgpu.logits(ids) - cpu.logits(ids)).max() <= 1e-3
    assert greedy(webgpu, ids, 8) == greedy(cpu, ids, 8)


def test_kernel_parameters_are_packed_by_field_name_from_the_wgsl_struct():
    """Every kernel's `struct Params` is read from its WGSL: values go to the field of their name with
    its type, and a misspelt or forgotten field is an error instead of a shifted value."""
    from pocketlm.backends.webgpu.device import pack_params, param_fields, wgsl_constants

    assert [n for n, _ in param_fields("rms_norm")][:6] == [
        "n_rows",
        "dim",
        "x_off",
        "y_off",
        "has_weight",
        "eps",
    ]
    values = dict(n_rows=3, dim=80, x_off=5, y_off=0, has_weight=1, eps=1e-6, has_res=0, res_off=7)
    packed = pack_params("rms_norm", values)
    assert packed == [3, 80, 5, 0, 1, pytest.approx(1e-6), 0, 7] and isinstance(packed[5], float)
    without_eps = {k: v for k, v in values.items() if k != "eps"}
    with pytest.raises(ValueError, match="unknown parameters \\['epsilon'\\]"):
        pack_params("rms_norm", {**without_eps, "epsilon": 1e-6})
    with pytest.raises(ValueError, match="unset \\['eps'\\]"):
        pack_params("rms_norm", without_eps)
    ops = wgsl_constants("elementwise", "OP")
    assert ops == {
        "add": 0,
        "mul": 1,
        "scale": 2,
        "silu": 3,
        "gelu_tanh": 4,
        "softcap": 5,
        "gelu": 6,
        "sub": 7,
        "shift": 8,
        "silu_mul": 9,
        "gelu_tanh_mul": 10,
        "gelu_mul": 11,
    }


def test_a_kernel_variant_keeps_only_its_own_blocks_of_the_wgsl():
    """`#if` / `#elif` / `#else` / `#endif` pick a variant's code ("linear+int4+norm+one"): the others'
    is not in it (a CPU device pays for every instruction on every workgroup); a stray directive is an
    error."""
    from pocketlm.backends.webgpu import device

    int4_one = device.wgsl_source("linear+int4+norm+one")
    int8_tiles = device.wgsl_source("linear+int8+gated")
    assert "#" not in int4_one and "fn store(" in int4_one
    assert "highs(w.x, hw, 0u)" in int4_one and "int8x4(w.x)" not in int4_one
    assert "fn one_token(" in int4_one and "fn one_token(" not in int8_tiles
    assert "fn token_norms(" in int4_one and "gelu_erf" not in int4_one and "merged(" not in int4_one
    assert "int8x4(w.x)" in int8_tiles and "lows(w[i]" not in int8_tiles
    int5_one = device.wgsl_source("linear+int4+int5+norm+one")  # the fifth bits: in +int5 only
    assert "q[row + loads + j / 4u]" in int5_one and "q[row + loads" not in int4_one
    assert "gelu_erf" in int8_tiles and "fn token_norms(" not in int8_tiles
    assert device.param_fields("linear+int4+norm+one") == device.param_fields("linear")
    assert device.binding_types("linear+f32+plain") == device.binding_types("linear+int4+merged+one")
    text = "a\n#if x\nb\n#if y\nc\n#else\nd\n#endif\n#elif z\ne\n#else\nf\n#endif\ng\n"
    assert device._select(text, {"x"}, "t") == "a\nb\nd\ng\n"
    assert device._select(text, {"x", "y", "z"}, "t") == "a\nb\nc\ng\n"
    assert device._select(text, {"z"}, "t") == "a\ne\ng\n"
    assert device._select(text, set(), "t") == "a\nf\ng\n"
    with pytest.raises(ValueError, match="#if without #endif"):
        device._select("#if x\n", set(), "t")
    with pytest.raises(ValueError, match="#else without #if at line 2"):
        device._select("a\n#else\n", set(), "t")


def test_kernels_compiled_in_the_background_while_weights_upload_are_the_ones_dispatched(tiny, tmp_path):
    """prepare() starts compiling what every pass runs before it uploads; the first pass takes those
    pipelines (waiting for any still compiling) instead of compiling them again."""
    from pocketlm.convert import ConversionConfig, convert

    model, _, f32 = tiny("llama")
    path = convert(f32, tmp_path / "q8.gguf", ConversionConfig(quant="q8_0"), progress=False)
    lm = load(path, backend="webgpu")
    device = lm.ops.device
    guessed = set(device._compiling) | set(device._pipelines)
    one = {f"linear+int8+{x}+one" for x in ("norm", "gated", "merged")}
    assert guessed == one | {
        "matmul+int8",
        "attention",
        "attention+fresh",
        "kv_write",
        "rms_norm",
        "argmax",
        "topk+count",
        "topk+gather",
        "topk+pick",
    }
    compiling = dict(device._compiling)
    ids = prompt_ids(model.config.vocab_size, 3)
    cache = lm.make_cache(16)
    prefill(lm, cache, ids)
    decode_step(lm, cache, ids[0])
    for kernel, future in compiling.items():
        if kernel in device._pipelines:
            assert device._pipelines[kernel] is future.result()[1]
    assert {"linear+int8+norm+one", "attention", "attention+fresh"} <= set(device._pipelines)
    with pytest.raises(FileNotFoundError):  # a kernel that fails to compile fails where it is used
        device.precompile(["no_such_kernel"])
        device.pipeline("no_such_kernel")


# -- fused kernels: each against the same ops computed one at a time by the numpy reference -------


def _vector(name: str, n: int, seed: int) -> Tensor:
    return f32_tensor(name, np.random.default_rng(seed).standard_normal(n) + 1.0)


Q5_0, Q8_0, Q4_K, Q6_K = GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K


@pytest.mark.parametrize(
    "types",
    [
        (GGMLType.F32,) * 3,
        (Q8_0,) * 3,
        (GGMLType.Q4_1,) * 3,
        (GGMLType.Q6_K,) * 3,
        (Q5_0,) * 3,
        (Q5_0, Q5_0, Q8_0),
    ],
    ids=lambda types: "-".join(t.name for t in types),
)
@pytest.mark.parametrize("T", [1, 5])
def test_norm_then_stacked_linears_with_biases_run_as_one_dispatch(gpu, types, T):
    """RMSNorm read on the way by q/k/v stacked as one matrix (odd row counts), biases in the epilogue;
    matrices held differently (Gemma 3's Q8_0 values beside Q5_0 queries and keys) stack as int8."""
    cols = 256
    tag = "-".join(t.name for t in types)
    ws = [
        weight(t, rows, cols, seed=i, name=f"stack{T}-{tag}")
        for i, (t, rows) in enumerate(zip(types, (37, 12, 12)))
    ]
    biases = [_vector(f"b{i}-{tag}-{T}", w.shape[0], i) for i, w in enumerate(ws)]
    norm = _vector(f"n-{tag}-{T}", cols, 9)
    x = np.random.default_rng(T).standard_normal((T, cols)).astype(np.float32)
    normed = REFERENCE.rms_norm(x, norm, 1e-6)
    gpu.device.trace = []
    outs = gpu.linears(gpu.rms_norm(gpu.upload(x), norm, 1e-6), ws, biases)
    kernels = [d[0] for d in gpu.device.trace]
    gpu.device.trace = None
    variant = {GGMLType.F32: "f32", GGMLType.Q4_1: "int4", Q5_0: "int4+int5"}.get(types[-1], "int8")
    assert kernels == [f"linear+{variant}+norm" + ("+one" if T == 1 and variant != "f32" else "")]
    for out, w, b in zip(outs, ws, biases):
        expected = REFERENCE.linear(normed, w, b)
        np.testing.assert_allclose(run(gpu, out), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    single = gpu.linear(gpu.upload(normed), ws[1], biases[1])  # a stacked matrix still runs alone
    np.testing.assert_allclose(
        run(gpu, single), REFERENCE.linear(normed, ws[1], biases[1]), rtol=1e-4, atol=1e-4
    )


def test_a_layers_stack_held_unlike_is_uploaded_as_int8_at_load():
    """prepare() holds q/k/v (and gate/up) alike where their types would be held differently, so that
    the first prompt stacks them without uploading them again; stacks held alike keep their bits."""
    from dataclasses import replace

    from pocketlm.backends.webgpu.backend import INT8, _held_alike

    def named(tensor_type, name):
        return replace(weight(tensor_type, 64, 256), name=name)

    mixed = [named(t, f"blk.0.attn_{r}.weight") for t, r in zip((Q5_0, Q5_0, Q8_0), "qkv")]
    same = [named(Q5_0, f"blk.1.ffn_{r}.weight") for r in ("gate", "up")]
    # Q4_K_M's Q6_K values beside Q4_K queries and keys would not stack as int8 either (16 values a
    # scale, no offsets): they keep their own bits
    unstackable = [named(t, f"blk.2.attn_{r}.weight") for t, r in zip((Q4_K, Q4_K, Q6_K), "qkv")]
    assert _held_alike(mixed + same + unstackable) == {w.name: INT8 for w in mixed}


def test_float16_scales_only_where_exact_and_normal():
    """A float16 subnormal scale (a Q8_0 block of values under 0.008) stays float32: drivers may flush
    float16 subnormals to zero when unpacking."""
    from pocketlm.backends.webgpu.backend import _as_half

    none = np.zeros((1, 0), np.float32)
    assert _as_half(np.array([[0.5, 0.0]], np.float32), none)
    assert not _as_half(np.array([[0.5, 2.0**-20]], np.float32), none)  # subnormal in float16
    assert not _as_half(np.array([[0.1, 0.5]], np.float32), none)  # 0.1 is no float16
    assert not _as_half(np.array([[0.5]], np.float32), none)  # an odd number a row


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("T", [1, 11])
def test_gated_activation_read_by_the_down_projection_and_residual_added(gpu, act, T):
    """down(act(gate) * up) + h: one dispatch for a few tokens (the activation computed where the
    down projection reads it), the product computed first for many; the residual in the epilogue."""
    cols, ffn = 64, 96
    gate_up = [weight(GGMLType.Q8_0, ffn, cols, seed=s, name=f"gu-{act}-{T}") for s in (1, 2)]
    down = weight(GGMLType.Q4_0, cols, ffn, seed=3, name=f"down-{act}-{T}")
    rng = np.random.default_rng(7)
    x, h = rng.standard_normal((2, T, cols)).astype(np.float32)
    g, u = (REFERENCE.linear(x, w) for w in gate_up)
    expected = REFERENCE.linear(getattr(REFERENCE, act)(g) * u, down) + h
    gate, up = gpu.linears(gpu.upload(x), gate_up, [None, None])
    gpu.device.trace = []
    y = gpu.upload(h) + gpu.linear(getattr(gpu, act)(gate) * up, down)
    ours = run(gpu, y)
    kernels = [d[0] for d in gpu.device.trace]
    gpu.device.trace = None
    held = "int8"  # Q4_0 of 96 columns: not whole runs of 64 values, so held as int8
    assert kernels == ([f"linear+{held}+gated+one"] if T == 1 else ["elementwise", f"matmul+{held}"])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_post_norm_with_the_residual_added_is_one_dispatch(gpu):
    rng = np.random.default_rng(8)
    x, h = rng.standard_normal((2, 3, 80)).astype(np.float32)
    norm = _vector("post", 80, 4)
    gpu.device.trace = []
    ours = run(gpu, gpu.upload(h) + gpu.rms_norm(gpu.upload(x), norm, 1e-6))
    assert [d[0] for d in gpu.device.trace] == ["rms_norm"]
    gpu.device.trace = None
    np.testing.assert_allclose(ours, h + REFERENCE.rms_norm(x, norm, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 6, 12])
@pytest.mark.parametrize("neox", [True, False])
def test_qk_norms_and_rope_applied_by_the_cache_write_and_the_attention_kernel(gpu, T, neox):
    """Qwen 3 / Gemma 3 order: per-head RMSNorm of q and k, RoPE on the first dims, values normed
    without weight (Gemma 4); keys go through the cache write, queries through the attention kernel."""
    rng = np.random.default_rng(T)
    D, start = 64, 90
    q = rng.standard_normal((start + T, 4, D)).astype(np.float32)
    k, v = rng.standard_normal((2, start + T, 2, D)).astype(np.float32)
    q_norm, k_norm = _vector(f"qn{T}{neox}", D, 1), _vector(f"kn{T}{neox}", D, 2)
    positions = np.arange(start + T)

    def reference(x, norm):
        return REFERENCE.rope(REFERENCE.rms_norm(x, norm, 1e-6), positions, 10000.0, 32, neox)

    rq, rk, rv = reference(q, q_norm), reference(k, k_norm), REFERENCE.rms_norm(v, None, 1e-6)
    expected = REFERENCE.attention(rq[start:], rk, rv, positions[start:], positions, 0.125, None, None)
    cache = gpu.layer_cache(256, 2, D, D, None)
    counts = []
    for first, stop in ((0, start), (start, start + T)):
        gpu.device.set_step(first, np.zeros(stop - first))
        span = positions[first:stop]
        qs, ks, vs = (gpu.upload(a[first:stop]) for a in (q, k, v))
        qs = gpu.rope(gpu.rms_norm(qs, q_norm, 1e-6), span, 10000.0, 32, neox)
        ks = gpu.rope(gpu.rms_norm(ks, k_norm, 1e-6), span, 10000.0, 32, neox)
        gpu.device.trace = []
        keys, values, _ = cache.update_and_fetch(ks, gpu.rms_norm(vs, None, 1e-6), first)
        out = gpu.attention(qs, keys, values, span, None, 0.125)
        ours = run(gpu, out)
        counts.append([d[0] for d in gpu.device.trace])
        gpu.device.trace = None
    assert counts[-1][:2] == ["kv_write", "kv_write"]  # k and v uploaded separately: one each
    assert counts[-1][2:] == (["attention", "attention_merge"] if T <= 8 else ["attention"])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_decode_step_is_five_dispatches_a_layer(tiny, arch):
    """The fused decode step: the embedding; per layer norm + q/k/v, split attention that writes
    the token's key and value ((q/k norms and) RoPE on the way), its merge + output projection +
    residual, norm + gate/up, activation + down + residual; the final norm with the output matrix."""
    from pocketlm.backends.webgpu import WebGPUBackend  # noqa: F401 (skips with the module fixture)
    from pocketlm.engine import decode_step, prefill

    model, path, lm = tiny_on_gpu(tiny, arch)
    cache = lm.make_cache(128)
    prefill(lm, cache, prompt_ids(model.config.vocab_size, 20))
    decode_step(lm, cache, 5)
    assert lm.step.dispatches(cache) == 5 * model.config.num_hidden_layers + 2


def test_gemma3_post_norms_and_their_sums_are_read_by_the_next_one_token_product(tiny, tmp_path):
    """Gemma's post-attention and post-feed-forward norms and the residual sums after them are
    computed by the product that reads them (+resnorm: gate/up, the next layer's q/k/v, the output
    matrix), which also leaves the sum for the later residual: five dispatches a layer. Decode logits
    as the reference backend's (float activations) on a Q8_0 file, whose products take that path."""
    from pocketlm.backends.webgpu import WebGPUBackend  # noqa: F401 (skips with the module fixture)
    from pocketlm.convert import ConversionConfig, convert
    from pocketlm.engine import decode_step, prefill

    model, hf, _ = tiny("gemma3")
    path = convert(hf, tmp_path / "q8.gguf", ConversionConfig(quant="q8_0"), progress=False)
    reference, webgpu = load(path, backend="reference"), load(path, backend="webgpu")
    ids = prompt_ids(model.config.vocab_size, 60)  # decode crosses from the first 64 keys to the next
    caches = [lm.make_cache(256) for lm in (reference, webgpu)]
    tokens = [prefill(lm, cache, ids).argmax() for lm, cache in zip((reference, webgpu), caches)]
    assert tokens[0] == tokens[1]
    token = int(tokens[0])
    for _ in range(8):
        expected, ours = (decode_step(lm, cache, token) for lm, cache in zip((reference, webgpu), caches))
        assert np.abs(ours - expected).max() <= 1e-3
        token = int(expected.argmax())
    # embedding, its scale; per layer q/k/v, attention, output projection, gate/up, down; the output
    # matrix and the logits' soft-cap
    assert model.config.final_logit_softcapping
    assert webgpu.step.dispatches(caches[1]) == 5 * model.config.num_hidden_layers + 4


@pytest.mark.parametrize("per_head", [False, True])
def test_a_residual_sum_with_a_normed_branch_feeds_a_one_token_product(gpu, per_head):
    """h = x + norm(b) * w_post, then W (norm(h) * w): the product computes h on the way (+resnorm)
    and leaves it for later reads; a branch normed per head (rows narrower than h) is summed first."""
    rng = np.random.default_rng(7)
    x, b = (rng.standard_normal((1, 64)).astype(np.float32) for _ in range(2))
    w_post = f32_tensor(f"post-{per_head}", rng.standard_normal(16 if per_head else 64) + 1.0)
    w_pre = f32_tensor("pre", rng.standard_normal(64) + 1.0)
    m = weight(GGMLType.Q8_0, 40, 64, seed=3, name="resnorm-w")
    branch = b.reshape(1, 4, 16) if per_head else b
    h_expected = x + REFERENCE.rms_norm(branch, w_post, 1e-6).reshape(1, 64)
    expected = REFERENCE.linear(REFERENCE.rms_norm(h_expected, w_pre, 1e-5), m)
    normed = gpu.rms_norm(gpu.upload(branch), w_post, 1e-6)
    h = gpu.upload(x) + (normed.reshape(1, 64) if per_head else normed)
    gpu.device.trace = []
    y = gpu.linear(gpu.rms_norm(h, w_pre, 1e-5), m)
    ours = run(gpu, y)
    kernels, gpu.device.trace = [t[0] for t in gpu.device.trace], None
    assert kernels == (["rms_norm", "linear+int8+norm+one"] if per_head else ["linear+int8+resnorm+one"])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(run(gpu, h), h_expected, rtol=1e-5, atol=1e-5)


def test_one_token_through_a_large_matrix_uses_more_rows_a_workgroup(gpu):
    """8,200 rows (an output matrix's kind of size, not a multiple of the 16 rows a workgroup)."""
    w = weight(GGMLType.Q4_K, 8200, 256, name="large")
    x = np.random.default_rng(3).standard_normal((1, 256)).astype(np.float32)
    expected = REFERENCE.linear(x, w)
    np.testing.assert_allclose(
        run(gpu, gpu.linear(gpu.upload(x), w)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_split_attention_is_merged_by_the_output_projection_that_reads_it(gpu):
    rng = np.random.default_rng(21)
    S, D = 150, 64
    q = rng.standard_normal((1, 4, D)).astype(np.float32)
    k, v = rng.standard_normal((2, S, 2, D)).astype(np.float32)
    wo = weight(GGMLType.Q8_0, 40, 4 * D, name="wo")
    cache = gpu.layer_cache(256, 2, D, D, None)
    gpu.device.set_step(0, np.zeros(S))
    cache.update_and_fetch(gpu.upload(k), gpu.upload(v), 0)
    gpu.to_host(gpu.upload(np.zeros(1)))  # submit the cache writes before the step moves
    gpu.device.set_step(S - 1, np.zeros(1))
    keys, values = cache_tensors(gpu, cache)
    gpu.device.trace = []
    out = gpu.linear(gpu.attention(gpu.upload(q), keys, values, np.array([S - 1]), None, 0.125), wo)
    ours = run(gpu, out)
    assert [d[0].split("+")[0] for d in gpu.device.trace] == ["attention", "linear"]
    gpu.device.trace = None
    attended = REFERENCE.attention(q, k, v, np.array([S - 1]), np.arange(S), 0.125)
    expected = REFERENCE.linear(attended.reshape(1, -1), wo)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def cache_tensors(gpu, cache):
    """The cache's keys and values as the attention op receives them."""
    from pocketlm.backends.webgpu.backend import GpuTensor

    return GpuTensor(gpu, cache.keys, cache.k_shape), GpuTensor(gpu, cache.values, cache.v_shape)


def products_and_rows_match(gpu, w: Tensor, T: int) -> None:
    """W x for T random tokens and three of W's rows as a table, against the numpy reference."""
    x = np.random.default_rng(T).standard_normal((T, w.shape[1])).astype(np.float32)
    expected = REFERENCE.linear(x, w)
    ours = run(gpu, gpu.linear(gpu.upload(x), w))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    ids = np.array([36, 0, 5])
    gpu.device.set_step(0, ids)
    np.testing.assert_allclose(
        run(gpu, gpu.embedding(w, ids)), REFERENCE.embedding(w, ids), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("tensor_type", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K])
@pytest.mark.parametrize("T", [1, 5, 11])
def test_four_bit_weights_stay_four_bits_on_the_gpu(gpu, tensor_type, T):
    """Q4_0 / Q4_1 / Q4_K matrices are uploaded as nibbles (half the bytes of the int8 repacking) and
    multiplied as such by each path: one token, a few, the tiled product of many."""
    from pocketlm.backends.webgpu.backend import NIBBLES

    cols = 256 if tensor_type == GGMLType.Q4_K else 128
    w = weight(tensor_type, 37, cols, seed=40 + T, name="nibbles")
    m = gpu.matrix(w)
    assert m.storage == NIBBLES and m.chunks[0][2][0].size == 37 * cols // 2
    products_and_rows_match(gpu, w, T)


@pytest.mark.parametrize("tensor_type", [GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K])
@pytest.mark.parametrize("T", [1, 5, 11])
def test_five_bit_weights_stay_five_bits_on_the_gpu(gpu, tensor_type, T):
    """Q5_0 / Q5_1 / Q5_K matrices of whole 128-value groups are uploaded in 5 bits a value (nibbles,
    then their fifth bits), the 32-value types' scales and offsets as float16 (what their blocks hold),
    and multiplied as such by each path (one token, a few, the tiled product of many), and read as a
    table."""
    from pocketlm.backends.webgpu.backend import NIBBLES5

    cols = 256 if tensor_type == GGMLType.Q5_K else 384
    w = weight(tensor_type, 37, cols, seed=50 + T, name="fifths")
    m = gpu.matrix(w)
    per_scale = 4 if tensor_type == GGMLType.Q5_K else 2  # K scales are float16 times 6-bit integers
    assert m.storage == NIBBLES5 and m.half == (per_scale == 2)
    assert m.row_bytes == [cols * 5 // 8, cols // 32 * per_scale, cols // 32 * per_scale]  # bytes a row
    products_and_rows_match(gpu, w, T)


@pytest.mark.parametrize("tensor_type", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1])
def test_scales_held_as_float16_where_the_file_holds_them_so(gpu, tensor_type):
    """Q8_0, Q4_0 and Q4_1 keep their float16 scales (and offsets) as float16 on the GPU: a Q8_0
    matrix takes the file's bytes, no more; its products and rows are unchanged."""
    w = weight(tensor_type, 21, 128, seed=7, name="half")
    m = gpu.matrix(w)
    assert m.half and m.row_bytes[1] == 128 // 32 * 2
    if tensor_type == GGMLType.Q8_0:
        assert 21 * sum(m.row_bytes) == w.nbytes
    for T in (1, 3, 20):
        x = np.random.default_rng(T).standard_normal((T, 128)).astype(np.float32)
        expected = REFERENCE.linear(x, w)
        ours = run(gpu, gpu.linear(gpu.upload(x), w))
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("arch", ["gemma4", "gemma3n"])
def test_the_per_layer_table_is_streamed_to_the_gpu_not_uploaded(tiny, arch):
    """Rows of the per-layer table are read from the file per pass (as on the CPU); with
    ple_in_ram it is uploaded whole instead; both give the CPU backend's logits (Gemma 3n's
    table lacks the last ids, which read its row 0)."""
    from pocketlm.engine import decode_step, prefill
    from pocketlm.models.gemma3n import PER_LAYER_TABLE

    model, _, path = tiny(arch)
    try:
        streamed, in_ram = load(path, backend="webgpu"), load(path, backend="webgpu", ple_in_ram=True)
    except UnsupportedError as e:
        pytest.skip(str(e))
    cpu = load(path, kv_cache="f32")
    assert streamed.streamed == {PER_LAYER_TABLE} and not in_ram.streamed
    ids = prompt_ids(model.config.vocab_size, 12)
    for lm in (streamed, in_ram):
        assert np.abs(lm.logits(ids) - cpu.logits(ids)).max() <= 1e-3
    assert PER_LAYER_TABLE not in streamed.ops._matrices and PER_LAYER_TABLE in in_ram.ops._matrices
    steps = []
    for lm in (streamed, cpu):  # replayed decode steps read the new token's rows
        cache = lm.make_cache(32)
        prefill(lm, cache, ids)
        steps.append([decode_step(lm, cache, t) for t in (5, 620, 9)])
    assert np.abs(np.array(steps[0]) - np.array(steps[1])).max() <= 1e-3


def test_greedy_steps_chained_on_the_gpu_give_the_host_argmax_and_leave_the_cache_as_decode_step(tiny):
    """generate_tokens' greedy path on the GPU: each token chosen by argmax.wgsl and fed to the next
    step there, one step submitted ahead of the reader. The tokens are the host's argmax of the same
    steps; a reader that stops after 4 leaves the cache as 4 decode steps do (the step run ahead is
    not counted: the next step, of another token, reads the host's position and token, not those the
    step run ahead left on the GPU)."""
    from pocketlm.engine import decode_step, greedy_tokens, prefill

    model, path, lm = tiny_on_gpu(tiny, "llama")
    ids = prompt_ids(model.config.vocab_size, 20)
    expected = greedy(lm, ids, 12)  # decode_step and numpy's argmax
    cache = lm.make_cache(len(ids) + 12)
    first = int(np.argmax(prefill(lm, cache, ids)))
    assert [first, *greedy_tokens(lm, cache, first, 11)] == expected
    assert cache.offset == len(ids) + 11

    chained, host = lm.make_cache(64), lm.make_cache(64)
    prefill(lm, chained, ids)
    tokens = greedy_tokens(lm, chained, first, 20)
    taken = [next(tokens) for _ in range(4)]
    tokens.close()
    assert taken == expected[1:5] and chained.offset == len(ids) + 4
    prefill(lm, host, ids)
    for token in expected[:4]:
        decode_step(lm, host, token)
    assert host.offset == chained.offset
    other = (taken[-1] + 1) % model.config.vocab_size  # not the token the step run ahead fed
    np.testing.assert_allclose(decode_step(lm, chained, other), decode_step(lm, host, other), atol=1e-5)


def _top_k_on_the_gpu(gpu, logits: np.ndarray, k: int) -> tuple[np.ndarray, int, int]:
    """topk.wgsl's dispatches over a row: (the ids the host keeps of its pairs, pairs written, flag)."""
    from pocketlm.backends.webgpu.backend import TOP_TIES, TopK

    top = TopK(gpu.device)
    raw = top.raw(gpu.upload(logits).buf, 0, len(logits), k)
    written, bad = int(raw[0]), int(raw[1])
    pairs = raw[top.pairs : top.pairs + 2 * min(written, k + TOP_TIES)].reshape(-1, 2)
    ids, values = pairs[:, 0].astype(np.int64), pairs[:, 1].copy().view(np.float32)
    np.testing.assert_array_equal(values, logits[ids])  # each pair is a logit and its id
    return np.sort(ids[np.lexsort((ids, -values))[:k]]), written, bad


@pytest.mark.parametrize("n, k", [(77, 3), (300, 256), (1000, 1), (49_157, 40), (262_144, 64)])
def test_the_top_k_logits_found_on_the_gpu_are_numpys_with_ties_taken_by_id(gpu, n, k):
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 3, n).astype(np.float32)
    logits[: n // 3] *= -1  # negatives and positives both near the top
    top = np.sort(logits)[-k]
    logits[rng.integers(0, n, 12)] = top  # several equal to the k-th largest
    logits[rng.integers(0, n, 3)] = -0.0
    expected = np.sort(np.lexsort((np.arange(n), -logits))[:k])  # by value, then the lower id
    found, written, bad = _top_k_on_the_gpu(gpu, logits, k)
    np.testing.assert_array_equal(found, expected)
    assert bad == 0 and written == np.count_nonzero(logits >= logits[expected].min())


def test_top_k_on_the_gpu_takes_minus_zero_as_zero(gpu):
    """Zeros of either sign are equal on the host, so ties at a k-th of 0 go by id whatever the sign."""
    logits = np.full(600, -1.0, np.float32)
    logits[[5, 50, 500]] = [-0.0, 0.0, -0.0]
    logits[[7, 70]] = 2.0
    found, written, _ = _top_k_on_the_gpu(gpu, logits, 3)  # the k-th is a zero: the lowest id's, -0's
    np.testing.assert_array_equal(found, [5, 7, 70])
    assert written == 5


def test_top_k_on_the_gpu_flags_non_finite_logits_and_too_many_ties(gpu):
    logits = np.linspace(-1, 1, 5000).astype(np.float32)
    for bad_value in (np.nan, np.inf, -np.inf):
        row = logits.copy()
        row[1234] = bad_value
        assert _top_k_on_the_gpu(gpu, row, 10)[2] == 1
    flat = np.zeros(5000, np.float32)  # every logit the k-th: more ties than the buffer holds
    assert _top_k_on_the_gpu(gpu, flat, 10)[1] == 5000


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (40, 0.8), (0, 1.0), (5000, 1.0)])
def test_sampled_tokens_with_the_top_k_chosen_on_the_gpu_are_the_host_samplers_for_a_seed(
    tiny, monkeypatch, top_k, top_p
):
    """generate_tokens with a top-k cut reads back only the top k logits (top_logits), and draws
    the tokens the host's sampler draws from whole rows of the same steps with the same seed; without
    a cut (0), or one wider than the vocabulary, whole rows are read."""
    from pocketlm.backends.webgpu import WebGPUBackend
    from pocketlm.engine import generate_tokens
    from pocketlm.sampling import make_sampler

    model, path, lm = tiny_on_gpu(tiny, "llama")
    lm.tokenizer.stop_ids = frozenset()
    ids = prompt_ids(model.config.vocab_size, 20)
    sampler = make_sampler(1.3, top_k, top_p, seed=11)  # hot: the draws land away from the best
    cache = lm.make_cache(64)
    expected = [int(sampler(prefill(lm, cache, ids)))]
    for _ in range(15):
        expected.append(int(sampler(decode_step(lm, cache, expected[-1]))))

    narrowed = []
    original = WebGPUBackend.top_logits

    def counted(self, step, cache, token, k):
        found = original(self, step, cache, token, k)
        narrowed.append(found[0] is not None)
        return found

    monkeypatch.setattr(WebGPUBackend, "top_logits", counted)
    sampler = make_sampler(1.3, top_k, top_p, seed=11)
    tokens = list(generate_tokens(lm, lm.make_cache(64), ids, sampler, max_new_tokens=16))
    assert tokens == expected
    assert len(set(tokens)) > 3  # sampled, not one token over and over
    cut = 0 < top_k < model.config.vocab_size
    assert narrowed == ([cut] * 15 if top_k else [])


def test_a_sampled_step_encoded_ahead_is_used_only_where_nothing_changed_since(tiny, monkeypatch):
    """top_logits encodes the cache's next step while the GPU runs the last (a pass of its own, not
    submitted): the next call for that cache at that position submits it; a step of another cache in
    between leaves it good, and one of the same cache (its position moved) has it dropped. The
    logits are those of plain decode steps either way."""
    model, path, lm = tiny_on_gpu(tiny, "llama")
    device = lm.ops.device
    adopted = []
    original = device.adopt
    monkeypatch.setattr(device, "adopt", lambda ahead: adopted.append(original(ahead)) or adopted[-1])
    ids = prompt_ids(model.config.vocab_size, 12)
    a, b, reference = lm.make_cache(40), lm.make_cache(40), lm.make_cache(40)
    for cache in (a, b, reference):
        prefill(lm, cache, ids)
    k = 7

    def expected(token: int) -> np.ndarray:
        row = decode_step(lm, reference, token)
        return np.sort(np.lexsort((np.arange(len(row)), -row))[:k]), row

    found = []
    for i, token in enumerate([3, 50, 7, 90, 11, 4]):
        top, row = expected(token)
        got, values = lm.ops.top_logits(lm.step, a, token, k)
        np.testing.assert_array_equal(got, top)
        np.testing.assert_allclose(values, row[top], atol=1e-5)
        found.append(len(adopted))
        if i == 2:
            decode_step(lm, b, token)  # another cache's step: a's step encoded ahead is still good
        if i == 4:
            decode_step(lm, a, 5)  # a's own step: the one encoded ahead is for the wrong position
            expected(5)
    assert a.offset == reference.offset
    assert adopted == [True] * 4  # calls 2-5 took theirs; the 6th found a moved position (never asked)
    assert found == [0, 1, 2, 3, 4, 4]


def test_the_tensors_of_a_pass_share_scratch_buffers(tiny, monkeypatch):
    """A buffer no tensor of the pass holds any more is handed out again: a prompt's pass makes a few
    scratch buffers, not one per tensor, and its logits are still the cpu backend's."""
    model, path, lm = tiny_on_gpu(tiny, "llama")
    device = lm.ops.device
    taken = []
    original = device.scratch
    monkeypatch.setattr(device, "scratch", lambda *a, **k: taken.append(1) or original(*a, **k))
    ids = prompt_ids(model.config.vocab_size, 32)
    logits = prefill(lm, lm.make_cache(48), ids)
    assert len(taken) >= 3 * len(device._arena)  # 42 tensors in 9 buffers here (one each before)
    np.testing.assert_allclose(logits, load(path, kv_cache="f32").logits(ids)[-1], atol=1e-3)
