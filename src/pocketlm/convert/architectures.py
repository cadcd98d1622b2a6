"""Per-architecture mappings from a Hugging Face checkpoint to llama.cpp's GGUF names and keys.

A mapping is registered under the checkpoint's `model_type`. It gives the metadata and, for every
tensor to write, its GGUF name, shape and a loader (`tensors`). Name tables map module paths
without their `.weight` / `.bias` suffix, which is carried over; `{i}` stands for the layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..formats.hf import HFCheckpoint

Transform = Callable[[np.ndarray], np.ndarray]
Loader = Callable[[], np.ndarray]
_MAPPINGS: dict[str, type[Mapping]] = {}


def register(*model_types: str):
    def wrap(cls):
        for model_type in model_types:
            _MAPPINGS[model_type] = cls
        return cls

    return wrap


def mapping_for(config: dict[str, Any], matformer: str | None = None) -> Mapping:
    """The mapping for a checkpoint's config; `matformer` (Gemma 3n only) slices it first."""
    model_type = config.get("model_type")
    if model_type not in _MAPPINGS:
        supported = ", ".join(sorted(_MAPPINGS))
        raise UnsupportedError(f"model_type {model_type!r} is not supported (supported: {supported})")
    if matformer is None:
        return _MAPPINGS[model_type](config)
    from .gemma3n import Gemma3nMapping, MatFormerSlice

    if _MAPPINGS[model_type] is not Gemma3nMapping:
        raise UnsupportedError(f"--matformer slices Gemma 3n checkpoints; this one is {model_type!r}")
    return Gemma3nMapping(config, MatFormerSlice.parse(matformer))


class RowLoader:
    """A loader (call it for the whole tensor) that can also read a band of rows, so that a tensor
    too large to hold is converted piece by piece."""

    def __init__(self, full: Loader, rows: Callable[[int, int], np.ndarray]):
        self._full, self.rows = full, rows

    def __call__(self) -> np.ndarray:
        return self._full()


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _plus_one(x: np.ndarray) -> np.ndarray:
    return x + 1.0


def rope_parameters(config: dict, layer_type: str | None = None) -> dict:
    """RoPE settings from either config style: top-level keys or transformers 5's `rope_parameters`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


_LLAMA_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",
    "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
    "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
    "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
    "model.layers.{i}.self_attn.o_proj": "blk.{i}.attn_output",
    "model.layers.{i}.self_attn.q_norm": "blk.{i}.attn_q_norm",
    "model.layers.{i}.self_attn.k_norm": "blk.{i}.attn_k_norm",
    "model.layers.{i}.mlp.gate_proj": "blk.{i}.ffn_gate",
    "model.layers.{i}.mlp.up_proj": "blk.{i}.ffn_up",
    "model.layers.{i}.mlp.down_proj": "blk.{i}.ffn_down",
}


class Mapping:
    arch = ""
    names: dict[str, str] = _LLAMA_NAMES
    norm_key = "attention.layer_norm_rms_epsilon"
    skip_parts = ("vision_tower", "multi_modal_projector", "audio_tower")  # we convert the text model

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.n_kv_heads = int(config.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.n_heads)
        self._patterns = [
            (re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), v)
            for k, v in self.names.items()
        ]

    # -- metadata -------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        c = self.config
        eps = c.get("rms_norm_eps", c.get("layer_norm_eps", c.get("layer_norm_epsilon", 1e-5)))
        ffn = c.get("intermediate_size") or c.get("ffn_hidden_size") or 4 * c["hidden_size"]
        return {
            "context_length": int(c.get("max_position_embeddings", 2048)),
            "embedding_length": int(c["hidden_size"]),
            "block_count": self.n_layers,
            "feed_forward_length": [int(d) for d in ffn]
            if isinstance(ffn, list)
            else int(ffn),  # per layer (MatFormer)
            "attention.head_count": self.n_heads,
            "attention.head_count_kv": self.n_kv_heads,
            "attention.key_length": self.head_dim,
            "attention.value_length": self.head_dim,
            self.norm_key: float(eps),
            "rope.freq_base": float(rope_parameters(c)["rope_theta"]),
        }

    def rope_dims(self) -> int:
        """Rotary dimensions per head (partial rotary models rotate only the first ones)."""
        return int(self.head_dim * float(rope_parameters(self.config)["partial_rotary_factor"]))

    # -- tensors --------------------------------------------------------------------------------

    def map_name(self, name: str) -> str | None:
        """GGUF name for a checkpoint tensor, None to skip; raises for tensors we do not know."""
        for old, new in (("model.language_model.", "model."), ("language_model.", "")):
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if any(part in name for part in self.skip_parts) or name.endswith("rotary_emb.inv_freq"):
            return None
        for pattern, target in self._patterns:
            match = pattern.match(name)
            if match:
                layer = match.group(1) if pattern.groups == 2 else None
                return f"{target.format(i=layer)}.{match.group(match.lastindex)}"
        raise UnsupportedError(f"checkpoint tensor {name!r} has no GGUF name in the {self.arch} mapping")

    def transform(self, gguf_name: str) -> Transform:
        return _identity

    def tensors(self, ckpt: HFCheckpoint) -> Iterator[tuple[str, tuple[int, ...], Loader]]:
        """(GGUF name, shape, loader) for every tensor to write."""
        for name in ckpt.names:
            gguf_name = self.map_name(name)
            if gguf_name is None:
                continue
            transform = self.transform(gguf_name)
            if transform is _identity:
                yield (
                    gguf_name,
                    ckpt.shape(name),
                    RowLoader(lambda n=name: ckpt.tensor(n), lambda a, b, n=name: ckpt.rows(n, a, b)),
                )
            else:
                yield gguf_name, ckpt.shape(name), lambda n=name, t=transform: t(ckpt.tensor(n))


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, interleave the two halves of the rows: [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs: how much Llama 3 scaling divides each RoPE frequency."""
    inv_freq = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


@register("llama")
class LlamaMapping(Mapping):
    arch = "llama"

    def metadata(self):
        keys = super().metadata()
        keys["rope.dimension_count"] = self.head_dim
        keys["vocab_size"] = int(self.config["vocab_size"])
        rope_type = rope_parameters(self.config)["rope_type"]
        if rope_type not in ("default", "llama3"):
            raise UnsupportedError(f"llama rope_type {rope_type!r} is not supported (default, llama3)")
        return keys

    def transform(self, gguf_name):
        # llama.cpp rotates adjacent pairs: reorder q/k rows from HF's rotate-half layout.
        if ".attn_q." in gguf_name:
            return lambda w: _permute_rows(w, self.n_heads)
        if ".attn_k." in gguf_name:
            return lambda w: _permute_rows(w, self.n_kv_heads)
        return _identity

    def tensors(self, ckpt):
        yield from super().tensors(ckpt)
        params = rope_parameters(self.config)
        if params["rope_type"] == "llama3":
            factors = llama3_rope_factors(params, self.head_dim)
            yield "rope_freqs.weight", factors.shape, lambda: factors


@register("qwen2")
class Qwen2Mapping(Mapping):
    arch = "qwen2"


@register("qwen3")
class Qwen3Mapping(Mapping):
    arch = "qwen3"


@register("gemma")
class GemmaMapping(Mapping):
    arch = "gemma"

    def transform(self, gguf_name):
        # Gemma norms scale by (1 + w); llama.cpp's files store 1 + w.
        return _plus_one if gguf_name.endswith("norm.weight") else _identity


@register("gemma3", "gemma3_text", "gemma2")
class Gemma3Mapping(GemmaMapping):
    names = {
        **_LLAMA_NAMES,
        "model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm",
        "model.layers.{i}.pre_feedforward_layernorm": "blk.{i}.ffn_norm",
        "model.layers.{i}.post_feedforward_layernorm": "blk.{i}.post_ffw_norm",
    }

    def __init__(self, config):
        # A multimodal checkpoint keeps the text model's settings under text_config.
        model_type = config["model_type"]
        super().__init__(config.get("text_config", config))
        self.arch = "gemma2" if model_type == "gemma2" else "gemma3"

    def metadata(self):
        c = self.config
        keys = super().metadata()
        period = 2 if self.arch == "gemma2" else int(c.get("sliding_window_pattern", 6))
        layer_types = c.get("layer_types") or [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(self.n_layers)
        ]
        full, sliding = rope_parameters(c, "full_attention"), rope_parameters(c, "sliding_attention")
        keys["rope.freq_base"] = float(full["rope_theta"])
        if self.arch == "gemma3":
            keys["rope.freq_base_swa"] = float(c.get("rope_local_base_freq", sliding["rope_theta"]))
        if full["rope_type"] == "linear":
            keys["rope.scaling.type"] = "linear"
            keys["rope.scaling.factor"] = float(full["factor"])
        if c.get("sliding_window"):
            keys["attention.sliding_window"] = int(c["sliding_window"])
            keys["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if c.get(name):
                keys[name] = float(c[name])
        scalar = c.get("query_pre_attn_scalar")
        if scalar and int(scalar) != self.head_dim:
            keys["pocketlm.attention.query_pre_attn_scalar"] = float(scalar)  # llama.cpp assumes head_dim
        return keys


@register("phi")
class PhiMapping(Mapping):
    arch = "phi2"
    norm_key = "attention.layer_norm_epsilon"
    names = {
        "model.embed_tokens": "token_embd",
        "model.final_layernorm": "output_norm",
        "lm_head": "output",
        "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
        "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
        "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
        "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
        "model.layers.{i}.self_attn.dense": "blk.{i}.attn_output",
        "model.layers.{i}.self_attn.q_layernorm": "blk.{i}.attn_q_norm",
        "model.layers.{i}.self_attn.k_layernorm": "blk.{i}.attn_k_norm",
        "model.layers.{i}.mlp.fc1": "blk.{i}.ffn_up",
        "model.layers.{i}.mlp.fc2": "blk.{i}.ffn_down",
    }

    def metadata(self):
        return super().metadata() | {
            "rope.dimension_count": self.rope_dims(),
            "pocketlm.attention.qk_norm": bool(self.config.get("qk_layernorm")),
        }


@register("stablelm")
class StableLmMapping(Mapping):
    arch = "stablelm"
    norm_key = "attention.layer_norm_epsilon"
    _per_head = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qk])_layernorm\.norms\.(\d+)\.weight$")

    def metadata(self):
        return super().metadata() | {
            "rope.dimension_count": self.rope_dims(),
            "pocketlm.attention.qk_norm": bool(self.config.get("qk_layernorm")),
            "pocketlm.parallel_residual": bool(self.config.get("use_parallel_residual")),
        }

    def tensors(self, ckpt):
        """One LayerNorm per head in the checkpoint; llama.cpp stacks them as [heads, head_dim]."""
        heads: dict[str, list[str]] = {}
        for name in ckpt.names:
            match = self._per_head.match(name)
            if match:
                heads.setdefault(f"blk.{match[1]}.attn_{match[2]}_norm.weight", []).append(name)
        per_head = {n for names in heads.values() for n in names}
        others = _Subset(ckpt, [n for n in ckpt.names if n not in per_head])
        yield from super().tensors(others)
        for gguf_name, names in heads.items():
            names.sort(key=lambda n: int(self._per_head.match(n)[3]))
            shape = (len(names), *ckpt.shape(names[0]))
            yield gguf_name, shape, lambda names=names: np.stack([ckpt.tensor(n) for n in names])


class _Subset:
    """A checkpoint seen through a subset of its tensor names."""

    def __init__(self, ckpt: HFCheckpoint, names: list[str]):
        self._ckpt, self.names = ckpt, names

    def shape(self, name):
        return self._ckpt.shape(name)

    def tensor(self, name):
        return self._ckpt.tensor(name)

    def rows(self, name, start, stop):
        return self._ckpt.rows(name, start, stop)


@register("falcon")
class FalconMapping(Mapping):
    arch = "falcon"
    norm_key = "attention.layer_norm_epsilon"
    names = {
        "transformer.word_embeddings": "token_embd",
        "transformer.ln_f": "output_norm",
        "lm_head": "output",
        "transformer.h.{i}.input_layernorm": "blk.{i}.attn_norm",
        # falcon-40b's two norms, named as llama.cpp does: attn_norm_2 is the one before attention
        "transformer.h.{i}.ln_attn": "blk.{i}.attn_norm_2",
        "transformer.h.{i}.ln_mlp": "blk.{i}.attn_norm",
        "transformer.h.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",  # falcon-rw: before the MLP
        "transformer.h.{i}.self_attention.query_key_value": "blk.{i}.attn_qkv",
        "transformer.h.{i}.self_attention.dense": "blk.{i}.attn_output",
        "transformer.h.{i}.mlp.dense_h_to_4h": "blk.{i}.ffn_up",
        "transformer.h.{i}.mlp.dense_4h_to_h": "blk.{i}.ffn_down",
    }

    def __init__(self, config):
        super().__init__(config)
        c = config
        if c.get("new_decoder_architecture"):
            self.n_kv_heads = int(c.get("num_kv_heads") or self.n_heads)
        elif c.get("multi_query", True):
            self.n_kv_heads = 1
        else:
            self.n_kv_heads = int(c.get("num_kv_heads") or self.n_heads)

    def metadata(self):
        keys = super().metadata()
        if self.config.get("alibi"):
            keys["attention.max_alibi_bias"] = 8.0
            del keys["rope.freq_base"]
        c = self.config  # parallel attention + MLP (7b / 40b) or sequential blocks (rw), said outright
        keys["pocketlm.parallel_residual"] = bool(
            c.get("parallel_attn", True) or c.get("new_decoder_architecture")
        )
        return keys

    def transform(self, gguf_name):
        return self._qkv_to_blocks if ".attn_qkv." in gguf_name else _identity

    def _qkv_to_blocks(self, w: np.ndarray) -> np.ndarray:
        """Falcon's fused rows -> [all q; all k; all v], the order llama.cpp's graph slices."""
        d, rest = self.head_dim, w.shape[1:]
        if self.config.get("new_decoder_architecture"):  # per kv group: its q heads, then k, then v
            g = w.reshape(self.n_kv_heads, self.n_heads // self.n_kv_heads + 2, d, *rest)
            parts = [g[:, :-2], g[:, -2], g[:, -1]]
        elif self.n_kv_heads == 1:  # multi-query: q heads, then the one k and v
            g = w.reshape(self.n_heads + 2, d, *rest)
            parts = [g[:-2], g[-2], g[-1]]
        else:  # multi-head: per head q, k, v
            g = w.reshape(self.n_heads, 3, d, *rest)
            parts = [g[:, 0], g[:, 1], g[:, 2]]
        return np.concatenate([p.reshape(-1, *rest) for p in parts])


from . import gemma3n, gemma4  # noqa: E402,F401  (register the gemma3n and gemma4 mappings)
