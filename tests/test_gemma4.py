"""Gemma 4 beyond the shared parity suite (which runs the tiny "gemma4" config like every other
architecture: logits within 1e-3 of transformers, 32 greedy tokens, chunked prefill, q8_0 / q4_0 /
q4_1 on the same rounded weights; llama.cpp reading our files is in test_convert): what the tiny
config exercises, the converter's keys, the variants it refuses, the per-layer table left in the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import prompt_ids

from pocketlm.api import load
from pocketlm.convert import ConversionConfig, convert
from pocketlm.convert.architectures import mapping_for
from pocketlm.errors import UnsupportedError
from pocketlm.formats.gguf import GGUFFile
from pocketlm.kvcache import LayerCache, SharedLayerCache
from pocketlm.models.gemma4 import PER_LAYER_TABLE


def test_the_tiny_config_has_two_head_sizes_shared_kv_double_wide_ffns_and_partial_rope(tiny):
    model, _, gguf = tiny("gemma4")
    f = GGUFFile(gguf)
    m, t = f.metadata, f.tensors
    assert m["gemma4.attention.key_length"] == 32 and m["gemma4.attention.key_length_swa"] == 16
    assert [t[f"blk.{i}.attn_q.weight"].shape[0] for i in range(8)] == [64, 64, 64, 128] * 2  # 4 heads
    assert list(m["gemma4.feed_forward_length"]) == [96] * 4 + [192] * 4  # the 4 KV-sharing layers: twice
    assert m["gemma4.attention.shared_kv_layers"] == 4
    assert all(f"blk.{i}.attn_k.weight" not in t for i in (4, 5, 6, 7))
    factors = t["rope_freqs.weight"].dequantize()
    assert list(factors[:4]) == [1.0] * 4 and np.all(factors[4:] == np.float32(1e30))  # 8 of 32 dims turn
    assert m["gemma4.attention.sliding_window"] == 16 and m["gemma4.final_logit_softcapping"] == 30.0
    lm = load(gguf, kv_cache="f32")  # transformers' keys and values are float32
    cache = lm.make_cache(64)
    assert [type(c) for c in cache.layers] == [LayerCache] * 4 + [SharedLayerCache] * 4
    assert [c.source for c in cache.layers[4:]] == [2, 2, 2, 3]  # the last earlier layer of each kind
    # the prompts of the parity suite are longer than the window, and the logits reach the cap
    ids = prompt_ids(model.config.vocab_size, 64)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    ours = lm.logits(ids)
    assert np.abs(ours - expected).max() <= 1e-3
    scalars = [float(t[f"blk.{i}.layer_output_scale.weight"].dequantize()[0]) for i in range(8)]
    assert len(set(scalars)) == 8  # randomized, so a missing or misplaced scale would show


def test_the_converter_reads_the_full_layers_head_size_from_either_config_style(tiny):
    _, folder, _ = tiny("gemma4")
    saved = json.loads((folder / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved  # how transformers 5 saves it
    hub_style = {k: v for k, v in saved.items() if k != "per_layer_config"} | {"global_head_dim": 32}
    for config in (saved, hub_style):
        assert mapping_for(config).metadata()["attention.key_length"] == 32


@pytest.mark.parametrize(
    "flag, message",
    [
        ({"enable_moe_block": True}, "mixture-of-experts"),
        ({"attention_k_eq_v": True}, "keys used as values"),
        ({"use_bidirectional_attention": "all"}, "not a causal LM"),
    ],
)
def test_variants_we_do_not_run_are_refused_in_one_line(tiny, flag, message):
    _, folder, _ = tiny("gemma4")
    config = json.loads((folder / "config.json").read_text()) | flag
    with pytest.raises(UnsupportedError, match=message):
        mapping_for(config)


def test_a_multimodal_checkpoint_converts_its_text_model(tiny, tmp_path):
    """Gemma 4 checkpoints are Gemma4ForConditionalGeneration: the text model under
    model.language_model., the config under text_config, towers beside it."""
    from safetensors.numpy import load_file, save_file

    _, folder, gguf = tiny("gemma4")
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            tensors = {n.replace("model.", "model.language_model.", 1): v for n, v in load_file(f).items()}
            tensors["model.vision_tower.patch.weight"] = np.zeros((4, 4), np.float32)
            tensors["model.embed_vision.proj.weight"] = np.zeros((4, 4), np.float32)
            save_file(tensors, wrapped / f.name)
        elif f.name == "config.json":
            text = json.loads(f.read_text())
            f_out = {"model_type": "gemma4", "text_config": text, "tie_word_embeddings": True}
            (wrapped / f.name).write_text(json.dumps(f_out))
        else:
            (wrapped / f.name).write_bytes(f.read_bytes())
    out = convert(wrapped, tmp_path / "wrapped.gguf", ConversionConfig(quant="f32"), progress=False)
    a, b = GGUFFile(gguf), GGUFFile(out)
    assert set(a.tensors) == set(b.tensors)
    ids = list(range(3, 40))
    assert np.array_equal(load(gguf).logits(ids), load(out).logits(ids))


def test_per_layer_table_is_left_in_the_file(tiny, tmp_path):
    _, folder, _ = tiny("gemma4")
    path = convert(folder, tmp_path / "q8_0.gguf", ConversionConfig(quant="q8_0"), progress=False)
    lm = load(path)
    table = lm.file.tensors[PER_LAYER_TABLE]
    assert lm.streamed == {PER_LAYER_TABLE} and lm.streamed_bytes == table.nbytes
    held = {*lm.ops._packed, *lm.ops._dequantized, *lm.ops._pinned}
    assert held and PER_LAYER_TABLE not in held
