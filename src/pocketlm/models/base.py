"""What every architecture shares: metadata reading, the attention block, gated MLPs, the cache.

An architecture module receives GGUF metadata (a dict), its weights by llama.cpp name, and a
backend that provides the ops; it never sees files, kernels or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..backends.base import ALIBI, LAYER_NORM
from ..errors import ModelFileError
from ..formats.gguf import arch_key
from ..kvcache import KVCache, LayerCache

_REQUIRED = object()


@dataclass
class ModelArgs:
    """Hyper-parameters read from `{arch}.*` metadata; subclasses list `_keys` field -> key."""

    architecture: str

    _keys = {}  # field name -> metadata key without the "{arch}." prefix (see formats.gguf.arch_key)

    _per_layer = frozenset()  # int fields that may also be one value per layer (a list)
    _positive = frozenset()  # fields that must be at least 1 (integers) or above 0 (numbers)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelArgs:
        arch = metadata["general.architecture"]
        values = {"architecture": arch}
        keys = {name: arch_key(arch, key) for name, key in cls._keys.items()}
        values.update({name: metadata[key] for name, key in keys.items() if key in metadata})
        missing = [keys[f.name] for f in fields(cls) if f.name not in values and f.default is _REQUIRED]
        if missing:
            raise ModelFileError(f"model metadata lacks {', '.join(missing)}")
        for f in fields(cls):
            if f.name in keys and f.name in values:
                values[f.name] = cls._checked(keys[f.name], f.name, values[f.name], str(f.type))
        return cls(**values)

    @classmethod
    def _checked(cls, key: str, name: str, value: Any, annotation: str) -> Any:
        """A metadata value as its field's type says (int, float, str, bool, optionally None),
        within sane bounds; other fields (`object`) are the architecture's to check."""
        kinds = {k.strip() for k in annotation.split("|")}
        if value is None and "None" in kinds:
            return None
        if "int" in kinds:
            low = 1 if name in cls._positive else 0
            if name in cls._per_layer and isinstance(value, (list, np.ndarray)) and len(value):
                return [_int(key, v, low) for v in value]
            return _int(key, value, low)
        if "float" in kinds:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not np.isfinite(value)
                or name in cls._positive
                and value <= 0
            ):
                sign = "positive" if name in cls._positive else "finite"
                raise ModelFileError(f"model metadata {key} must be a {sign} number, not {value!r}")
            return float(value)
        if (
            "str" in kinds
            and not isinstance(value, str)
            or "bool" in kinds
            and not isinstance(value, (bool, np.bool_))
        ):
            raise ModelFileError(f"model metadata {key} must be a {annotation}, not {value!r}")
        return value


MAX_DIMENSION = 1 << 24  # no count or size in a model's hyper-parameters comes near this


def _int(key: str, value: Any, low: int) -> int:
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or not low <= value <= MAX_DIMENSION
    ):
        raise ModelFileError(
            f"model metadata {key} must be an integer in [{low}, {MAX_DIMENSION}], not {value!r}"
        )
    return int(value)


REQUIRED: Any = _REQUIRED


def feature(flag: bool | None, w: Weights, tensor: str) -> bool:
    """An architecture feature llama.cpp's metadata has no key for: our converter's `pocketlm.*`
    flag when the file has one (the tensors are then required or refused by it), else llama.cpp's
    own rule for such files, the presence of `tensor`."""
    return bool(flag) if flag is not None else w.optional(tensor) is not None


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
    rope_dims: int | None = None  # partial rotary models rotate only the first dimensions
    norm_eps: float = 1e-5
    context_length: int = 2048

    _positive = frozenset(
        {
            "hidden_size",
            "n_layers",
            "n_heads",
            "ffn_size",
            "n_kv_heads",
            "head_dim",
            "context_length",
            "rope_base",
        }
    )
    _keys = {
        "hidden_size": "embedding_length",
        "n_layers": "block_count",
        "n_heads": "attention.head_count",
        "ffn_size": "feed_forward_length",
        "n_kv_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "rope_base": "rope.freq_base",
        "rope_dims": "rope.dimension_count",
        "norm_eps": "attention.layer_norm_rms_epsilon",
        "context_length": "context_length",
    }

    def __post_init__(self):
        kv_heads = self.n_kv_heads or self.n_heads
        head_dim = self.head_dim or self.hidden_size // self.n_heads
        if self.n_heads % kv_heads or not 0 < kv_heads * head_dim <= 1 << 20:
            raise ModelFileError(
                f"model metadata: {self.n_heads} attention heads, {kv_heads} key/value heads of "
                f"{head_dim} values do not make an attention layer"
            )

    def attention_spec(self, **overrides) -> AttentionSpec:
        """The usual attention of these hyper-parameters (NeoX RoPE over rope_dims, 1/sqrt(d)
        scaling), with `overrides` for what an architecture does differently."""
        head_dim = self.head_dim or self.hidden_size // self.n_heads
        usual = dict(
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads or self.n_heads,
            head_dim=head_dim,
            rope_base=self.rope_base,
            rope_dims=self.rope_dims or head_dim,
            rope_neox=True,
            scale=head_dim**-0.5,
        )
        return AttentionSpec(**(usual | overrides))


@dataclass
class LayerNormArgs(DecoderArgs):
    """Models with LayerNorm, whose epsilon llama.cpp stores under another key, and two features
    llama.cpp has no key for (our converter writes `pocketlm.*` flags; see `feature`)."""

    qk_norm: bool | None = None  # per-head q/k LayerNorm (Phi, StableLM 2)
    parallel_residual: bool | None = None  # attention and MLP read one norm's output (StableLM 2 12B)

    _keys = {
        **DecoderArgs._keys,
        "norm_eps": "attention.layer_norm_epsilon",
        "qk_norm": "pocketlm.attention.qk_norm",
        "parallel_residual": "pocketlm.parallel_residual",
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
    rope_dims: int  # 0: no RoPE (ALiBi models)
    rope_neox: bool
    scale: float
    window: int | None = None
    softcap: float | None = None
    rope_freq_scale: float = 1.0  # linear RoPE scaling: positions are multiplied by this
    qk_norm: str | None = None  # per-head q/k norm, "rms" or "layer": its weights are then required
    alibi: np.ndarray | None = None  # per-head slopes, already multiplied by `scale`


class Attention:
    """q/k/v projections (separate or fused), per-head q/k norms where the spec says so, RoPE,
    cached attention, output projection; biases wherever the weights have them."""

    def __init__(self, w: Weights, prefix: str, spec: AttentionSpec, norm_eps: float):
        self.spec, self.norm_eps = spec, norm_eps
        if spec.qk_norm is None:  # a q/k norm the architecture does not have would be silently ignored
            for name in (f"{prefix}.attn_q_norm.weight", f"{prefix}.attn_k_norm.weight"):
                if w.optional(name) is not None:
                    raise ModelFileError(f"tensor {name!r} is not part of this architecture (no q/k norm)")
        wqkv, bqkv = w.optional(f"{prefix}.attn_qkv.weight"), w.optional(f"{prefix}.attn_qkv.bias")
        if wqkv is None:
            self.wq, self.wk, self.wv = (w(f"{prefix}.attn_{n}.weight") for n in "qkv")
            self.bq, self.bk, self.bv = (w.optional(f"{prefix}.attn_{n}.bias") for n in "qkv")
        else:  # a fused matrix (rows: all q, then k, then v), read as three row views of the file
            q_size, kv_size = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
            bounds = [(0, q_size), (q_size, q_size + kv_size), (q_size + kv_size, wqkv.shape[0])]
            self.wq, self.wk, self.wv = (wqkv.rows(a, b) for a, b in bounds)
            self.bq, self.bk, self.bv = (bqkv.rows(a, b) if bqkv is not None else None for a, b in bounds)
        self.wo, self.bo = w(f"{prefix}.attn_output.weight"), w.optional(f"{prefix}.attn_output.bias")
        self.q_norm = self.k_norm = None
        if spec.qk_norm is not None:
            self.q_norm, self.k_norm = w(f"{prefix}.attn_q_norm.weight"), w(f"{prefix}.attn_k_norm.weight")
        self.q_norm_bias, self.k_norm_bias = (
            w.optional(f"{prefix}.attn_q_norm.bias"),
            w.optional(f"{prefix}.attn_k_norm.bias"),
        )
        self.freq_factors = w.optional("rope_freqs.weight")

    def project(self, ops, x: np.ndarray):
        s, T = self.spec, len(x)
        q, k, v = ops.linears(x, [self.wq, self.wk, self.wv], [self.bq, self.bk, self.bv])
        return (
            q.reshape(T, s.n_heads, s.head_dim),
            k.reshape(T, s.n_kv_heads, s.head_dim),
            v.reshape(T, s.n_kv_heads, -1),
        )

    def norm_qk(self, ops, q: np.ndarray, k: np.ndarray):
        if self.spec.qk_norm is None:
            return q, k
        if self.spec.qk_norm == "layer":
            return (
                ops.layer_norm(q, self.q_norm, self.q_norm_bias, self.norm_eps),
                ops.layer_norm(k, self.k_norm, self.k_norm_bias, self.norm_eps),
            )
        return ops.rms_norm(q, self.q_norm, self.norm_eps), ops.rms_norm(k, self.k_norm, self.norm_eps)

    def __call__(self, ops, x: np.ndarray, positions: np.ndarray, cache: LayerCache) -> np.ndarray:
        s = self.spec
        q, k, v = self.project(ops, x)
        q, k = self.norm_qk(ops, q, k)
        if s.rope_dims:
            factors = ops.dense(self.freq_factors) if self.freq_factors is not None else None
            q = ops.rope(q, positions, s.rope_base, s.rope_dims, s.rope_neox, s.rope_freq_scale, factors)
            k = ops.rope(k, positions, s.rope_base, s.rope_dims, s.rope_neox, s.rope_freq_scale, factors)
        keys, values, key_positions = cache.update_and_fetch(k, v, int(positions[0]))
        out = ops.attention(q, keys, values, positions, key_positions, s.scale, s.window, s.softcap, s.alibi)
        return ops.linear(out, self.wo, self.bo)

    def make_cache(self, max_tokens: int, layer_cache=LayerCache) -> LayerCache:
        s = self.spec
        return layer_cache(max_tokens, s.n_kv_heads, s.head_dim, s.head_dim, s.window)


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al.), with the interleaved extra heads when n_heads is
    not a power of two, as llama.cpp and transformers compute them."""
    n = 2 ** int(np.floor(np.log2(n_heads)))
    m0, m1 = 2.0 ** (-max_bias / n), 2.0 ** (-max_bias / 2 / n)
    slopes = [m0 ** (i + 1) if i < n else m1 ** (2 * (i - n) + 1) for i in range(n_heads)]
    return np.asarray(slopes, np.float32)


class GatedMLP:
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu_tanh; biases if present."""

    def __init__(self, w: Weights, prefix: str, activation: str):
        self.gate, self.up, self.down = (w(f"{prefix}.ffn_{n}.weight") for n in ("gate", "up", "down"))
        self.gate_b, self.up_b, self.down_b = (
            w.optional(f"{prefix}.ffn_{n}.bias") for n in ("gate", "up", "down")
        )
        self.activation = activation

    def __call__(self, ops, x: np.ndarray) -> np.ndarray:
        act = getattr(ops, self.activation)
        gate, up = ops.linears(x, [self.gate, self.up], [self.gate_b, self.up_b])
        h = act(gate) * up
        return ops.linear(h, self.down, self.down_b)


class MLP:
    """down(act(up(x))), the two-matrix MLP of GPT-2 style models (Phi, Falcon)."""

    def __init__(self, w: Weights, prefix: str, activation: str):
        self.up, self.up_b = w(f"{prefix}.ffn_up.weight"), w.optional(f"{prefix}.ffn_up.bias")
        self.down, self.down_b = w(f"{prefix}.ffn_down.weight"), w.optional(f"{prefix}.ffn_down.bias")
        self.activation = activation

    def __call__(self, ops, x: np.ndarray) -> np.ndarray:
        return ops.linear(
            getattr(ops, self.activation)(ops.linear(x, self.up, self.up_b)), self.down, self.down_b
        )


class Norm:
    """RMSNorm or LayerNorm (with its bias when the file has one), by weight name."""

    def __init__(self, w: Weights, name: str, norm_type: str, eps: float):
        self.weight, self.bias = w(f"{name}.weight"), w.optional(f"{name}.bias")
        self.norm_type, self.eps = norm_type, eps  # "rms" or "layer"

    def __call__(self, ops, x: np.ndarray) -> np.ndarray:
        if self.norm_type == "layer":
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


class CausalLM:
    """The contract the engine relies on: `make_cache`, `forward`, `vocab_size`, `args`.

    Subclasses name their layer class (`block`) and `norm_type`, or build `layers` themselves
    after `init_io`; embedding scale and final soft-capping are set where an architecture has them.
    """

    args: DecoderArgs
    layers: list
    requires: frozenset = frozenset()  # backend capabilities beyond the common ops (backends.base)
    embed_scale: float | None = None
    final_softcap: float | None = None
    block: type | None = None  # the layer class, built as block(w, i, args)
    norm_type = "rms"

    def __init__(self, args: DecoderArgs, w: Weights):
        self.args = args
        self.init_io(w, self.norm_type, args.norm_eps)
        self.layers = [self.block(w, i, args) for i in range(args.n_layers)]
        alibi = any(getattr(layer.attention.spec, "alibi", None) is not None for layer in self.layers)
        self.requires = (
            self.requires
            | ({LAYER_NORM} if self.norm_type == "layer" else set())
            | ({ALIBI} if alibi else set())
        )

    def init_io(self, w: Weights, norm_type: str, eps: float) -> None:
        self.token_embd = w("token_embd.weight")
        self.output_norm = Norm(w, "output_norm", norm_type, eps)
        output = w.optional("output.weight")
        self.output = output if output is not None else self.token_embd  # tied when absent
        self.output_bias = w.optional("output.bias")
        self.vocab_size = self.token_embd.shape[0]

    def make_cache(self, max_tokens: int, layer_cache=LayerCache) -> KVCache:
        """The KV cache for max_tokens positions; `layer_cache` makes each layer's (the backend's kind)."""
        return KVCache(
            [layer.attention.make_cache(max_tokens, layer_cache) for layer in self.layers], max_tokens
        )

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
        h = ops.embedding(self.token_embd, ids)
        return h * np.float32(self.embed_scale) if self.embed_scale else h

    def head(self, ops, h: np.ndarray) -> np.ndarray:
        logits = ops.linear(self.output_norm(ops, h), self.output, self.output_bias)
        return ops.softcap(logits, self.final_softcap) if self.final_softcap else logits
