"""Gemma 3n beyond the shared parity suite (which runs the tiny "gemma3n" config like every other
architecture): KV sharing, per-layer embeddings read from the file per token, MatFormer slicing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny, prompt_ids

from pocketlm import ConversionConfig, convert, load
from pocketlm.convert.gemma3n import MatFormerSlice
from pocketlm.engine import decode_step, prefill
from pocketlm.errors import InvalidOptionError, UnsupportedError
from pocketlm.kvcache import LayerCache, SharedLayerCache
from pocketlm.models.gemma3n import PER_LAYER_TABLE


def test_shared_kv_layers_keep_no_cache_and_read_their_sources(tiny):
    model, _, gguf = tiny("gemma3n")
    lm = load(gguf)
    cache = lm.make_cache(64)
    # 10 layers, the last 5 shared: sliding ones reuse layer 3, the global one (9) reuses layer 4
    assert [type(c) for c in cache.layers] == [LayerCache] * 5 + [SharedLayerCache] * 5
    assert [c.source for c in cache.layers[5:]] == [3, 3, 3, 3, 4]
    assert all(c.nbytes == 0 for c in cache.layers[5:])
    assert not hasattr(lm.model.layers[7].attention, "wk")
    twin = cache.copy()
    assert twin.layers[9].layer is twin.layers[4] and twin.layers[9].layer is not cache.layers[4]


def test_session_clone_continues_like_the_original(tiny):
    from pocketlm import LlmInference

    _, _, gguf = tiny("gemma3n")
    llm = LlmInference(gguf, max_tokens=96, temperature=0.0, use_chat_template=False)
    session = llm.create_session()
    session.add_query_chunk("the river and the")
    first = session.generate_response(max_new_tokens=8)
    twin = session.clone()
    session.add_query_chunk(" then")
    twin.add_query_chunk(" then")
    assert session.generate_response(max_new_tokens=8) == twin.generate_response(max_new_tokens=8)
    assert first


def test_per_layer_table_is_read_row_by_row_and_never_held(tiny, tmp_path, monkeypatch):
    _, folder, _ = tiny("gemma3n")
    path = convert(folder, tmp_path / "q8_0.gguf", ConversionConfig(quant="q8_0"), progress=False)
    lm = load(path)
    table = lm.file.tensors[PER_LAYER_TABLE]
    assert lm.streamed == {PER_LAYER_TABLE} and lm.streamed_bytes == table.nbytes
    held = {*lm.ops._packed, *lm.ops._dequantized, *lm.ops._pinned}
    assert held and PER_LAYER_TABLE not in held  # every other matrix was repacked, not this one
    reads = []
    embedding = lm.ops.embedding
    monkeypatch.setattr(
        lm.ops,
        "embedding",
        lambda w, ids, **kw: (reads.append((w.name, list(ids), kw)), embedding(w, ids, **kw))[1],
    )
    ids = prompt_ids(lm.model.vocab_size, 20, seed=4)
    cache = lm.make_cache(24)
    token = int(np.argmax(prefill(lm, cache, ids)))
    decode_step(lm, cache, token)
    L, table_rows = lm.model.args.n_layers, table.shape[0]
    assert any(i >= table_rows for i in ids)  # ids the table lacks read its row 0
    limits = dict(stride=L, id_limit=table_rows)
    expected = [(list(ids), dict(limits, offset=i)) for i in range(L)]
    expected += [([token], dict(limits, offset=i)) for i in range(L)]
    assert [(rows, kw) for name, rows, kw in reads if name == PER_LAYER_TABLE] == expected
    assert PER_LAYER_TABLE not in {*lm.ops._packed, *lm.ops._dequantized, *lm.ops._pinned}


def test_ple_in_ram_gives_the_same_logits(tiny, tmp_path):
    _, folder, _ = tiny("gemma3n")
    path = convert(folder, tmp_path / "q8_0.gguf", ConversionConfig(quant="q8_0"), progress=False)
    ids = prompt_ids(640, 32, seed=5)
    in_ram = load(path, ple_in_ram=True)
    assert PER_LAYER_TABLE in in_ram.ops._pinned and in_ram.streamed_bytes == 0
    np.testing.assert_array_equal(in_ram.logits(ids), load(path).logits(ids))


@pytest.fixture(scope="module")
def ple_heavy(tmp_path_factory):
    """A tiny Gemma 3n whose per-layer table (262144 x 10 layers x 48, float16) is 252 MB of a
    270 MB file."""
    folder = tmp_path_factory.mktemp("ple-heavy")
    build_tiny("gemma3n", folder / "hf", vocab_size_per_layer_input=262144, hidden_size_per_layer_input=48)
    return convert(folder / "hf", folder / "f16.gguf", ConversionConfig(quant="f16"), progress=False)


def _bench(path, *flags) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pocketlm",
            "bench",
            str(path),
            "--prompt-tokens",
            "64",
            "--gen-tokens",
            "16",
            "--json",
            *flags,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak while running needs /proc (Linux)")
def test_streaming_the_per_layer_table_keeps_its_size_out_of_the_peak_memory_of_a_run(ple_heavy):
    """While a prompt and tokens run, the streamed table is not in memory: the peak then is lower
    by the table's size. (The whole process's peak is lower too, but on this model, 18 MB of
    weights besides the table, the streamed process's peak is the load's moment of loading the
    kernels, when LLVM's code is paged in, before it is let go: `CpuBackend.load_kernels`.)"""
    table_mb = load(ple_heavy).file.tensors[PER_LAYER_TABLE].nbytes / 1e6
    assert table_mb > 200
    streamed, in_ram = _bench(ple_heavy), _bench(ple_heavy, "--ple-in-ram")
    saving = in_ram["run_peak_rss_mb"] - streamed["run_peak_rss_mb"]
    print(
        f"\nPLE table {table_mb:.0f} MB: peak RSS while running streamed {streamed['run_peak_rss_mb']:.0f} MB, "
        f"in RAM {in_ram['run_peak_rss_mb']:.0f} MB (saving {saving:.0f} MB); whole process "
        f"{streamed['peak_rss_mb']:.0f} vs {in_ram['peak_rss_mb']:.0f} MB; decode "
        f"{streamed['decode_tokens_per_second']:.0f} vs {in_ram['decode_tokens_per_second']:.0f} tok/s"
    )
    assert streamed["params_streamed"] > 10 * streamed["params_resident"]
    assert saving > 0.9 * table_mb / 1.048576  # peak RSS is reported in MiB (VmHWM KiB / 1024)
    assert streamed["peak_rss_mb"] < in_ram["peak_rss_mb"]


# -- MatFormer ----------------------------------------------------------------------------------

E4B_LIKE = dict(
    num_hidden_layers=15,
    intermediate_size=[128] * 15,
    num_kv_shared_layers=5,
    activation_sparsity_pattern=[0.95] * 3 + [0.0] * 12,
)
SLICE = {"layers_to_skip": [3, 11], "ffn_dims": [64, 96, 128, 32, 64, 96, 128, 32, 64, 96, 128, 32, 64]}


def slice_reference(model, spec: dict):
    """transformers' Gemma3nForCausalLM holding the slice, cut here with the MatFormer rule."""
    import transformers

    c = model.config
    kept = [i for i in range(c.num_hidden_layers) if i not in spec["layers_to_skip"]]
    first_shared = c.num_hidden_layers - c.num_kv_shared_layers
    config = transformers.Gemma3nTextConfig(
        **{
            **c.to_dict(),
            "num_hidden_layers": len(kept),
            "intermediate_size": spec["ffn_dims"],
            "layer_types": [c.layer_types[i] for i in kept],
            "activation_sparsity_pattern": [c.activation_sparsity_pattern[i] for i in kept],
            "num_kv_shared_layers": sum(i >= first_shared for i in kept),
        }
    )
    P = c.hidden_size_per_layer_input
    parts = torch.cat([torch.arange(i * P, (i + 1) * P) for i in kept])
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers."):
            old, rest = name.split(".")[2], name.split(".", 3)[3]
            if int(old) not in kept:
                continue
            new, width = kept.index(int(old)), spec["ffn_dims"][kept.index(int(old))]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[:width]
            elif rest == "mlp.down_proj.weight":
                value = value[:, :width]
            name = f"model.layers.{new}.{rest}"
        elif name == "model.per_layer_model_projection.weight":
            value = value[parts]
        elif name == "model.embed_tokens_per_layer.weight":
            value = value[:, parts]
        state[name] = value.clone()
    sliced = transformers.Gemma3nForCausalLM(config).eval()
    missing, unexpected = sliced.load_state_dict(state, strict=False)
    assert not unexpected and all("k_proj" in m or "v_proj" in m or "k_norm" in m for m in missing), missing
    return sliced


@pytest.fixture(scope="module")
def matformer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("matformer")
    model = build_tiny("gemma3n", folder / "hf", **E4B_LIKE)
    config = ConversionConfig(quant="f32", matformer=json.dumps(SLICE))
    return (
        slice_reference(model, SLICE),
        convert(folder / "hf", folder / "sliced.gguf", config, progress=False),
        folder,
    )


def test_matformer_slice_matches_transformers_on_the_same_slice(matformer):
    reference, path, _ = matformer
    lm = load(path, kv_cache="f32")  # transformers' keys and values are float32
    assert lm.model.args.n_layers == 13 and lm.model.args.shared_kv_layers == 4
    assert [layer.down.shape[1] for layer in lm.model.layers] == SLICE["ffn_dims"]
    ids = prompt_ids(640, 64, seed=6)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(lm.logits(ids) - expected).max() <= 1e-3


def test_matformer_slice_greedy_32_steps_match_transformers(matformer):
    from test_parity_transformers import our_greedy, reference_greedy

    reference, path, _ = matformer
    ids = prompt_ids(640, 64, seed=7)
    assert our_greedy(load(path, kv_cache="f32"), ids, 32) == reference_greedy(reference, ids, 32)


def test_e2b_preset_turns_the_e4b_config_into_e2b():
    e4b = {
        "num_hidden_layers": 35,
        "num_kv_shared_layers": 15,
        "intermediate_size": [16384] * 35,
        "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(35)],
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 25,
    }
    config, kept = MatFormerSlice.parse("E2B").apply(e4b)
    assert kept == list(range(20)) + list(range(25, 35))
    assert config["num_hidden_layers"] == 30 and config["num_kv_shared_layers"] == 10
    assert config["intermediate_size"] == [8192] * 30
    assert config["activation_sparsity_pattern"] == [0.95] * 10 + [0.0] * 20
    assert config["layer_types"] == e4b["layer_types"][:30]  # whole 4 + 1 blocks were skipped


@pytest.mark.parametrize(
    "spec, message",
    [
        ('{"layers_to_skip": [8]}', "cannot skip layers \\[8, 9\\]"),
        ('{"layers_to_skip": [40]}', "model has layers 0..14"),
        ('{"ffn_dims": [64, 64]}', "2 FFN widths for the 15 kept layers"),
        (json.dumps({"ffn_dims": [256] * 15}), "exceed the checkpoint's FFN"),
        ("e9b", "must be a preset"),
        ('{"layers": [1]}', "unknown: \\['layers'\\]"),
    ],
)
def test_matformer_rejects_slices_that_cannot_run(matformer, tmp_path, spec, message):
    _, _, folder = matformer
    with pytest.raises(InvalidOptionError, match=message):
        convert(
            folder / "hf", tmp_path / "x.gguf", ConversionConfig(quant="f32", matformer=spec), progress=False
        )
    assert not (tmp_path / "x.gguf").exists()


def test_matformer_on_another_architecture_is_refused(tiny, tmp_path):
    _, folder, _ = tiny("gemma3")
    with pytest.raises(UnsupportedError, match="slices Gemma 3n checkpoints"):
        convert(folder, tmp_path / "x.gguf", ConversionConfig(matformer="e2b"), progress=False)
