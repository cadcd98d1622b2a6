"""What every architecture shares: metadata reading, the attention block, gated MLPs, the cache.

An architecture module receives GGUF metadata (a dict), its weights by llama.cpp name, and a
backend that provides the ops; it never sees files, kernels or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from ..errors import ModelFileError
from ..formats.gguf import arch_key
from ..kvcache import KVCache, LayerCache

_REQUIRED = object()


@dataclass
class ModelArgs:
    """Hyper-parameters read from `{arch}.*` metadata; subclasses list `_keys` field -> key."""

    architecture: str

    _keys = {}  # field name -> metadata key without the "{arch}." prefix (see formats.gguf.arch_key)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "ModelArgs":
        arch = metadata["general.architecture"]
        values = {"architecture": arch}
        keys = {name: arch_key(arch, key) for name, key in cls._keys.items()}
        values.update({name: metadata[key] for name, key in keys.items() if key in metadata})
        missing = [keys[f.name] for f in fields(cls) if f.name not in values and f.default is _REQUIRED]
        if missing:
            raise ModelFileError(f"model metadata lacks {', '.join(missing)}")
        return cls(**values)


REQUIRED: Any = _REQUIRED


@dataclass
class DecoderArgs(ModelArgs):
    """The hyper-parameters every decoder-only transformer has, under llama.cpp's key names."""

    hidden_size: int = REQUIRED
    n_layers: int = REQUIRED
    n_heads: int = REQUIRED
    ffn_size: int = REQUIRED
    n_kv_heads: int | None = None
    head_dim: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    context_length: int = 2048

    _keys = {
        "hidden_size": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
        "ffn_size": "feed_forward_length", "n_kv_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length", "rope_base": "rope.freq_base",
        "norm_eps": "attention.layer_norm_rms_epsilon", "context_length": "context_length",
    }


class Weights:
    """Tensors by llama.cpp name, with errors that say which one is missing."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = tensors

    def __call__(self, name: str) -> Any:
        if name not in self._tensors:
            raise ModelFileError(f"model file lacks tensor {name!r}")
        return self._tensors[name]

    def optional(self, name: str) -> Any:
        return self._tensors.get(name)


@dataclass
class AttentionSpec:
    """How one layer's attention behaves."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    rope_dims: int
    rope_neox: bool
    scale: float
    window: int | None = None
    softcap: float | None = None
    rope_freq_scale: float = 1.0  # linear RoPE scaling: positions are multiplied by this


class Attention:
    """q/k/v projections, optional per-head q/k norms, RoPE, cached attention, output projection."""

    def __init__(self, w: Weights, prefix: str, spec: AttentionSpec, norm_eps: float):
        self.spec, self.norm_eps = spec, norm_eps
        self.wq, self.wk, self.wv = w(f"{prefix}.attn_q.weight"), w(f"{prefix}.attn_k.weight"), w(f"{prefix}.attn_v.weight")
        self.bq, self.bk, self.bv = (w.optional(f"{prefix}.attn_{n}.bias") for n in "qkv")
        self.wo, self.bo = w(f"{prefix}.attn_output.weight"), w.optional(f"{prefix}.attn_output.bias")
        self.q_norm, self.k_norm = w.optional(f"{prefix}.attn_q_norm.weight"), w.optional(f"{prefix}.attn_k_norm.weight")

    def __call__(self, ops, x: np.ndarray, positions: np.ndarray, cache: LayerCache) -> np.ndarray:
        s = self.spec
        T = len(x)
        q = ops.linear(x, self.wq, self.bq).reshape(T, s.n_heads, s.head_dim)
        k = ops.linear(x, self.wk, self.bk).reshape(T, s.n_kv_heads, s.head_dim)
        v = ops.linear(x, self.wv, self.bv).reshape(T, s.n_kv_heads, -1)
        if self.q_norm is not None:
            q, k = ops.rms_norm(q, self.q_norm, self.norm_eps), ops.rms_norm(k, self.k_norm, self.norm_eps)
        q = ops.rope(q, positions, s.rope_base, s.rope_dims, s.rope_neox, s.rope_freq_scale)
        k = ops.rope(k, positions, s.rope_base, s.rope_dims, s.rope_neox, s.rope_freq_scale)
        keys, values, key_positions = cache.update_and_fetch(k, v, int(positions[0]))
        out = ops.attention(q, keys, values, positions, key_positions, s.scale, s.window, s.softcap)
        return ops.linear(out, self.wo, self.bo)

    def make_cache(self, max_tokens: int, v_dim: int | None = None) -> LayerCache:
        s = self.spec
        return LayerCache(max_tokens, s.n_kv_heads, s.head_dim, v_dim or s.head_dim, s.window)


class GatedMLP:
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, w: Weights, prefix: str, activation: str):
        self.gate, self.up, self.down = w(f"{prefix}.ffn_gate.weight"), w(f"{prefix}.ffn_up.weight"), w(f"{prefix}.ffn_down.weight")
        self.activation = activation

    def __call__(self, ops, x: np.ndarray) -> np.ndarray:
        act = getattr(ops, self.activation)
        return ops.linear(act(ops.linear(x, self.gate)) * ops.linear(x, self.up), self.down)


class CausalLM:
    """The contract the engine relies on: `make_cache`, `forward`, `vocab_size`, `context_length`."""

    args: ModelArgs
    layers: list

    def make_cache(self, max_tokens: int) -> KVCache:
        return KVCache([layer.attention.make_cache(max_tokens) for layer in self.layers], max_tokens)

    def forward(self, ops, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.offset.. and return logits [T or 1, vocab]."""
        positions = np.arange(cache.offset, cache.offset + len(ids))
        h = self.embed(ops, np.asarray(ids, np.int64))
        for i, layer in enumerate(self.layers):
            h = layer(ops, h, positions, cache[i])
        cache.offset += len(ids)
        if not all_logits:
            h = h[-1:]
        return self.head(ops, h)

    def embed(self, ops, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def head(self, ops, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError
