"""Per-architecture mappings from a Hugging Face checkpoint to llama.cpp's GGUF names and keys.

Each mapping is registered under the checkpoint's `model_type` and gives the metadata, and for
every checkpoint tensor its GGUF name plus a transform (or None to skip it).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from ..errors import UnsupportedError

Transform = Callable[[np.ndarray], np.ndarray]
_MAPPINGS: dict[str, type["Mapping"]] = {}


def register(*model_types: str):
    def wrap(cls):
        for model_type in model_types:
            _MAPPINGS[model_type] = cls
        return cls

    return wrap


def mapping_for(config: dict[str, Any]) -> "Mapping":
    model_type = config.get("model_type")
    if model_type not in _MAPPINGS:
        supported = ", ".join(sorted(_MAPPINGS))
        raise UnsupportedError(f"model_type {model_type!r} is not supported (supported: {supported})")
    return _MAPPINGS[model_type](config)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _plus_one(x: np.ndarray) -> np.ndarray:
    return x + 1.0


def rope_theta(config: dict, layer_type: str | None = None, default: float = 10000.0) -> float:
    """RoPE base from either config style: `rope_theta` or transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    if layer_type and layer_type in params:
        params = params[layer_type]
    return float(params.get("rope_theta", config.get("rope_theta", default)))


class Mapping:
    arch = ""
    # checkpoint name (after prefix stripping) -> GGUF name, with {i} for the layer
    names: dict[str, str] = {}
    skip_parts: tuple[str, ...] = ("vision_tower", "multi_modal_projector", "audio_tower")  # text only

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.n_layers = int(config["num_hidden_layers"])
        self._patterns = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in self.names.items()]

    def metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def transform(self, gguf_name: str) -> Transform:
        return _identity

    def map_name(self, name: str) -> str | None:
        """GGUF name for a checkpoint tensor, None to skip; raises for tensors we do not know."""
        for old, new in (("model.language_model.", "model."), ("language_model.", "")):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if any(part in name for part in self.skip_parts) or name.endswith("rotary_emb.inv_freq"):
            return None
        for pattern, target in self._patterns:
            match = pattern.match(name)
            if match:
                return target.format(i=match.group(1)) if match.groups() else target
        raise UnsupportedError(f"checkpoint tensor {name!r} has no GGUF name in the {self.arch} mapping")

    def head_count_keys(self) -> dict[str, Any]:
        c = self.config
        n_heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // n_heads)
        return {
            "context_length": int(c.get("max_position_embeddings", 2048)),
            "embedding_length": int(c["hidden_size"]),
            "block_count": self.n_layers,
            "feed_forward_length": int(c["intermediate_size"]),
            "attention.head_count": n_heads,
            "attention.head_count_kv": int(c.get("num_key_value_heads") or n_heads),
            "attention.key_length": head_dim,
            "attention.value_length": head_dim,
            "attention.layer_norm_rms_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        }


_DECODER_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


@register("llama")
class LlamaMapping(Mapping):
    arch = "llama"
    names = {**_DECODER_NAMES, "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight"}

    def metadata(self):
        c = self.config
        keys = self.head_count_keys()
        keys["rope.freq_base"] = rope_theta(c)
        keys["rope.dimension_count"] = keys["attention.key_length"]
        keys["vocab_size"] = int(c["vocab_size"])
        if (c.get("rope_parameters") or c.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
            raise UnsupportedError("llama rope scaling is not supported yet (rope_type must be default)")
        return keys

    def transform(self, gguf_name):
        # llama.cpp rotates adjacent pairs: reorder q/k rows from HF's rotate-half layout.
        c = self.config
        if gguf_name.endswith("attn_q.weight"):
            return lambda w: _permute_rows(w, int(c["num_attention_heads"]))
        if gguf_name.endswith("attn_k.weight"):
            return lambda w: _permute_rows(w, int(c.get("num_key_value_heads") or c["num_attention_heads"]))
        return _identity


def _permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, interleave the two halves of the rows: [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("gemma3", "gemma3_text")
class Gemma3Mapping(Mapping):
    arch = "gemma3"
    names = {
        **_DECODER_NAMES,
        "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
        "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
        "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
        "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    }

    def __init__(self, config):
        # A multimodal checkpoint keeps the text model's settings under text_config.
        super().__init__(config.get("text_config", config) | {"model_type": "gemma3"})

    def metadata(self):
        c = self.config
        keys = self.head_count_keys()
        layer_types = c.get("layer_types") or [
            "full_attention" if (i + 1) % int(c.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
            for i in range(self.n_layers)
        ]
        keys["rope.freq_base"] = rope_theta(c, "full_attention", 1_000_000.0)
        keys["rope.freq_base_swa"] = rope_theta(c, "sliding_attention", float(c.get("rope_local_base_freq", 10000.0)))
        scaling = (c.get("rope_parameters") or {}).get("full_attention") or c.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) == "linear":
            keys["rope.scaling.type"] = "linear"
            keys["rope.scaling.factor"] = float(scaling["factor"])
        if c.get("sliding_window"):
            keys["attention.sliding_window"] = int(c["sliding_window"])
            keys["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if c.get(name):
                keys[name] = float(c[name])
        scalar = c.get("query_pre_attn_scalar")
        if scalar and int(scalar) != keys["attention.key_length"]:
            keys["pocketlm.attention.query_pre_attn_scalar"] = float(scalar)  # llama.cpp assumes head_dim
        return keys

    def transform(self, gguf_name):
        # Gemma norms scale by (1 + w); llama.cpp's files store 1 + w.
        return _plus_one if gguf_name.endswith("norm.weight") else _identity
