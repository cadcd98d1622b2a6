"""The two real models against llama.cpp's answers recorded by scripts/make_llamacpp_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, load_fixture

from pocketlm import ConversionConfig, convert, load

MODELS = ["smollm2-135m", "gemma3-270m"]
CHAT_TEXT = "<start_of_turn>user\nHi there!<end_of_turn>\n<|im_start|>user\nHello<|im_end|>\n"


@pytest.fixture(scope="module")
def loaded(real_model):
    cache = {}
    return lambda name: cache.setdefault(name, load(real_model(name)))


@pytest.mark.parametrize("name", MODELS)
def test_token_ids_equal_llama_cpp_on_varied_text(loaded, name):
    tok, fixture = loaded(name).tokenizer, load_fixture(name)
    varied = (FIXTURES / "varied.txt").read_text(encoding="utf-8")
    assert tok.encode(varied, parse_special=False) == fixture["varied_ids"]
    assert tok.encode(varied + CHAT_TEXT) == fixture["varied_ids_special"]


@pytest.mark.parametrize("name", MODELS)
def test_decode_inverts_encode(loaded, name):
    tok = loaded(name).tokenizer
    varied = (FIXTURES / "varied.txt").read_text(encoding="utf-8")
    assert tok.decode(tok.encode(varied, parse_special=False)) == varied


def top1_agreement(ours: np.ndarray, theirs: list[int]) -> float:
    return float(np.mean(ours.argmax(axis=1) == np.asarray(theirs)))


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_top1_agrees_with_llama_cpp_on_the_f32_dequantized_file(loaded, name, tmp_path):
    """Where llama.cpp computes in float32 (weights dequantized to f32 by our converter), our
    logits match it: >= 98% top-1 over >= 256 positions, top-1 logits within 0.05."""
    fixture = load_fixture(name)
    path = convert(loaded(name).path, tmp_path / "f32.gguf", ConversionConfig(quant="f32"), progress=False)
    ids = fixture["passage_ids"]
    logits = load(path).logits(ids)
    assert len(ids) >= 256
    assert top1_agreement(logits, fixture["passage_f32_top1"]) >= 0.98
    ours_at_their_top1 = logits[np.arange(len(ids)), fixture["passage_f32_top1"]]
    assert np.abs(ours_at_their_top1 - fixture["passage_f32_top1_logit"]).max() <= 0.05


@pytest.mark.parametrize("name", MODELS)
def test_teacher_forced_top1_on_the_quantized_file_agrees_with_llama_cpp_as_well_as_llama_cpp_agrees_with_itself(
    loaded, name
):
    """On quantized files llama.cpp rounds activations to 8 bits, differently in its batched and
    its token-by-token paths; those two paths agree on 96-97% of top-1 tokens. We compute the
    exact product of the stored weights and must agree with llama.cpp's batched logits at least
    as well as its token-by-token path does. (The issue's 98% target is not met on these files:
    see the closing note of issue 2 for the figures.)"""
    fixture = load_fixture(name)
    logits = loaded(name).logits(fixture["passage_ids"])
    ours = top1_agreement(logits, fixture["passage_top1"])
    llama_cpp_self = float(
        np.mean(np.asarray(fixture["passage_top1_token_by_token"]) == fixture["passage_top1"])
    )
    print(
        f"{name}: top-1 agreement with llama.cpp {ours:.4f}; llama.cpp batched vs token-by-token {llama_cpp_self:.4f}"
    )
    assert ours >= llama_cpp_self


def test_cached_sentencepiece_merges_give_the_same_tokenizer(real_model, tmp_path, monkeypatch):
    """Gemma's merges are found once and read from POCKETLM_HOME/tokenizers the next time; the
    tokenizer built from the cache still equals llama.cpp's, and a damaged cache is rebuilt."""
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.tokenizer import GGUFTokenizer

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    metadata = GGUFFile(real_model("gemma3-270m")).metadata
    varied = (FIXTURES / "varied.txt").read_text(encoding="utf-8")
    expected = load_fixture("gemma3-270m")["varied_ids"]
    assert GGUFTokenizer(metadata).encode(varied, parse_special=False) == expected
    cached = list((tmp_path / "tokenizers").glob("merges-*.npy"))
    assert len(cached) == 1 and not list((tmp_path / "tokenizers").glob("*.tmp"))
    assert GGUFTokenizer(metadata).encode(varied, parse_special=False) == expected
    cached[0].write_bytes(b"not an array")
    assert GGUFTokenizer(metadata).encode(varied, parse_special=False) == expected
    assert np.load(cached[0]).shape[0] == 2  # rewritten


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_names_its_tokens_without_holding_the_vocabulary(loaded, real_model, name):
    from pocketlm.formats.gguf import GGUFFile

    tokens = GGUFFile(real_model(name)).metadata["tokenizer.ggml.tokens"]
    tok = loaded(name).tokenizer
    assert not hasattr(tok, "tokens")
    assert [tok.token(i) for i in (0, 1, 2, 100, tok.vocab_size - 1)] == [
        tokens[i] for i in (0, 1, 2, 100, len(tokens) - 1)
    ]
    assert tok.bos_token == tokens[tok.bos_id] and tok.eos_token == tokens[tok.eos_id]
