"""The converter: quantization policy, tokenizer and template carried over, GGUF requantization,
clear errors, atomic output, and files that llama.cpp runs."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, TINY, build_tiny, prompt_ids

from pocketlm import (
    ConversionConfig,
    InvalidOptionError,
    LlmInference,
    PocketLMError,
    UnsupportedError,
    convert,
    load,
)
from pocketlm.bench import bench_prompt
from pocketlm.formats.gguf import GGUFFile
from pocketlm.formats.quants import GGMLType

VARIED = (FIXTURES / "varied.txt").read_text(encoding="utf-8")
# ggml computes GELU through a float16 table: models with GELU agree within 1e-2, others 1e-3
F32_TOLERANCE = {k: 1e-2 for k in ("gemma", "gemma2", "gemma3", "gemma4", "phi", "falcon-7b", "falcon-40b")}


def test_mixed_bits_give_each_component_its_type(tiny, tmp_path):
    _, folder, _ = tiny("llama")
    config = ConversionConfig(quant="f16", attention_bits=8, ffn_bits=4, embedding_bits=8)
    f = GGUFFile(convert(folder, tmp_path / "m.gguf", config, progress=False))
    types = {name: t.type for name, t in f.tensors.items()}
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_output.weight"] == GGMLType.Q8_0
    assert types["blk.0.ffn_up.weight"] == types["blk.0.ffn_down.weight"] == GGMLType.Q4_0
    assert types["token_embd.weight"] == types["output.weight"] == GGMLType.Q8_0
    assert types["blk.0.attn_norm.weight"] == GGMLType.F32
    assert (
        ConversionConfig(quant="q4_1", ffn_bits=4).tensor_type("blk.0.ffn_up.weight", (64, 64))
        == GGMLType.Q4_1
    )


def test_rows_that_do_not_fill_blocks_fall_back_to_f16():
    assert ConversionConfig(quant="q4_0").tensor_type("blk.0.ffn_up.weight", (64, 48)) == GGMLType.F16


@pytest.mark.parametrize("options", [dict(quant="q3_k"), dict(ffn_bits=6)])
def test_bad_conversion_options_are_named(options):
    with pytest.raises(InvalidOptionError, match="quant|ffn-bits"):
        ConversionConfig(**options)


def test_byte_level_tokenizer_and_chat_template_survive_conversion(tiny):
    from tokenizers import Tokenizer

    _, folder, gguf = tiny("llama")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = load(gguf).tokenizer
    assert ours.encode(VARIED) == hf.encode(VARIED).ids
    assert "<|im_start|>assistant" in ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_tokenizer_survives_conversion(tiny):
    import sentencepiece as spm

    _, folder, gguf = tiny("gemma3")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ours = load(gguf).tokenizer
    assert ours.encode(VARIED, add_bos=False, parse_special=False) == sp.encode(VARIED)
    assert ours.encode("<start_of_turn>user")[:2] == [ours.bos_id, sp.piece_to_id("<start_of_turn>")]


def test_gguf_requantization_keeps_metadata_and_runs(real_model, tmp_path):
    src = GGUFFile(real_model("smollm2-135m"))
    out = convert(src.path, tmp_path / "q8.gguf", ConversionConfig(quant="q8_0"), progress=False)
    f = GGUFFile(out)
    assert {t.type for t in f.tensors.values()} == {GGMLType.Q8_0, GGMLType.F32}
    for key, value in src.metadata.items():
        if key != "general.file_type":
            assert f.value_types[key] == src.value_types[key]
            assert np.array_equal(np.asarray(f.metadata[key]), np.asarray(value)), key
    # The requantized model predicts as the source does (teacher-forced over real text), and generates.
    # (A greedy answer is no check: asked for France's capital, this 135M model's first token is a near
    # tie between "The" and "L'", which the 8-bit rounding of either file's weights or a prompt's
    # activations tips either way.)
    source, requantized = load(src.path), load(out)
    ids = bench_prompt(source.tokenizer, 256)
    assert np.mean(source.logits(ids).argmax(1) == requantized.logits(ids).argmax(1)) >= 0.9
    llm = LlmInference(out, temperature=0.0, max_tokens=64)
    assert llm.generate_response("What is the capital of France?").strip()


def test_unknown_model_type_lists_the_supported_ones(tiny, tmp_path):
    _, folder, _ = tiny("llama")
    copy = tmp_path / "ckpt"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    with pytest.raises(UnsupportedError, match=r"'mamba' is not supported \(supported: .*gemma3.*llama"):
        convert(copy, tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_conversion_leaves_no_file(tiny, tmp_path, monkeypatch, error):
    conv = importlib.import_module("pocketlm.convert")  # the package: pocketlm.convert is also a function

    _, folder, _ = tiny("llama")
    calls = {"n": 0}
    real_quantize = conv.quantize

    def quantize_then_fail(x, tensor_type):
        calls["n"] += 1
        if calls["n"] == 5:
            raise error()
        return real_quantize(x, tensor_type)

    monkeypatch.setattr(conv, "quantize", quantize_then_fail)
    with pytest.raises(error):
        convert(folder, tmp_path / "m.gguf", ConversionConfig(quant="q8_0"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_malicious_chat_template_is_stopped_by_the_sandbox(tiny):
    tok = load(tiny("llama")[2]).tokenizer
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PocketLMError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# llama.cpp runs every architecture we write except falcon-rw (ALiBi) and Phi with q/k LayerNorm
# (Phi-2 has none; llama.cpp's phi2 has no tensors for them): it refuses those files.
# Gemma 3n has its own test below: llama.cpp's loader wants the released models' shapes.
LLAMA_CPP_ARCHS = [k for k in TINY if k not in ("falcon-rw", "phi-qk-norm", "gemma3n")]


def llama_cpp_model(path):
    """llama.cpp with a float32 KV cache (type_k/type_v 0: its default f16 cache would add its own
    rounding), without its repacked buffers, which segfault on these 64-wide matrices on AMX machines."""
    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1] / "benchmarks")
    )  # the peer's loader lives there
    from llamacpp_peer import open_llama

    return open_llama(
        path, repack=False, n_ctx=128, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0
    )


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", LLAMA_CPP_ARCHS)
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_0"])
def test_converted_files_load_and_generate_in_llama_cpp(tiny, tmp_path, arch, quant):
    pytest.importorskip("llama_cpp")
    # llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim, as in
    # the released models) and ignores pocketlm's key for other values.
    model, folder, _ = tiny(arch, **({"query_pre_attn_scalar": 32} if arch == "gemma3" else {}))
    path = convert(folder, tmp_path / f"{quant}.gguf", ConversionConfig(quant=quant), progress=False)
    llm = llama_cpp_model(path)
    ids = prompt_ids(model.config.vocab_size, 48, seed=4)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])  # a copy: the completion below reuses the buffer
    ours = load(path, kv_cache="f32").logits(ids)  # llama.cpp runs here with a float32 cache too
    out = llm.create_completion("The sea", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"] is not None
    if quant == "f32":  # the same arithmetic up to ggml's float16 GELU table
        assert np.abs(ours - theirs).max() < F32_TOLERANCE.get(arch, 1e-3), np.abs(ours - theirs).max()
    else:  # llama.cpp rounds activations to 8 bits for quantized weights: close, not equal
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.9


@pytest.mark.llamacpp
def test_gemma3n_files_run_in_llama_cpp_which_differs_only_in_its_sparsity_std(tmp_path, monkeypatch):
    """llama.cpp's gemma3n hard-wires the released shapes (per-layer width 256, LAuReL rank 64,
    one FFN width, 35 layers with sparse FFNs in the first 10), so this tiny model has them. It
    also takes the n - 1 std in the sparsity cut-off where transformers takes the population std:
    with that one change our logits match its own within ggml's float16 GELU table."""
    pytest.importorskip("llama_cpp")
    from pocketlm.models.gemma3n import Block

    build_tiny(
        "gemma3n",
        tmp_path / "hf",
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=640,
        laurel_rank=64,
        num_hidden_layers=35,
        num_kv_shared_layers=15,
        intermediate_size=[128] * 35,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25,
    )
    path = convert(tmp_path / "hf", tmp_path / "f32.gguf", ConversionConfig(quant="f32"), progress=False)
    llm = llama_cpp_model(path)
    ids = prompt_ids(640, 48, seed=4)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    as_transformers = load(path, kv_cache="f32").logits(ids)
    monkeypatch.setattr(Block, "std_ddof", 1)
    ours = load(path, kv_cache="f32").logits(ids)
    print(
        f"\ngemma3n vs llama.cpp: max |d| {np.abs(ours - theirs).max():.3f} with llama.cpp's std, "
        f"{np.abs(as_transformers - theirs).max():.3f} with transformers'"
    )
    assert np.abs(ours - theirs).max() < 0.2
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) == 1.0


@pytest.mark.parametrize("arch", ["gemma3n", "llama"])
def test_large_tensors_converted_by_bands_of_rows_give_the_same_file(tiny, tmp_path, monkeypatch, arch):
    """Gemma 3n's per-layer table (2-2.4 B values in the released models) must not be held whole
    as float32: above CHUNK_VALUES a tensor is read from the mapped safetensors and quantized a band
    of rows at a time. With a tiny threshold every matrix goes that way; the bytes are the same."""
    conversion = importlib.import_module("pocketlm.convert")  # the module: pocketlm.convert is the function
    _, folder, _ = tiny(arch)
    whole = convert(folder, tmp_path / "whole.gguf", ConversionConfig(quant="q8_0"), progress=False)
    monkeypatch.setattr(conversion, "CHUNK_VALUES", 1000)
    banded = convert(folder, tmp_path / "banded.gguf", ConversionConfig(quant="q8_0"), progress=False)
    assert whole.read_bytes() == banded.read_bytes()


def test_converting_onto_a_folder_is_refused_before_any_work(tiny, tmp_path):
    """Named up front, not after converting every tensor (it used to end in a traceback)."""
    from pocketlm.errors import ModelFileError

    with pytest.raises(ModelFileError, match="is a folder; give the output file's name"):
        convert(tiny("llama")[1], tmp_path, ConversionConfig(quant="q8_0"), progress=False)
    assert list(tmp_path.iterdir()) == []
