"""Gemma 4's text decoder (E2B / E4B) -> llama.cpp's `gemma4` names and keys.

The full-attention layers' head size is the config's `global_head_dim` (transformers 5 saves it as
`per_layer_config` entries instead); their proportional partial RoPE becomes llama.cpp's
`rope_freqs` (1 for the rotated frequencies, 1e30 for the others). Keys and values of KV-sharing
layers, which nothing reads, are not written. Norm weights are stored as they are (Gemma 4
multiplies by w, not 1 + w). The MoE (26B-A4B) and k = v (31B) variants are refused.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from .architectures import Mapping, register, rope_parameters
from .gemma3n import _NAMES as GEMMA3N_NAMES

_NAMES = {  # Gemma 3n's, without AltUp and LAuReL, with the per-layer output scale
    **{
        k: v for k, v in GEMMA3N_NAMES.items() if not any(part in k for part in ("altup", "laurel", "v_norm"))
    },
    "model.layers.{i}.layer_scalar": "blk.{i}.layer_output_scale",
}


@register("gemma4", "gemma4_text")
class Gemma4Mapping(Mapping):
    arch = "gemma4"
    names = _NAMES
    skip_parts = (*Mapping.skip_parts, "embed_vision", "embed_audio")

    def __init__(self, config):
        text = config.get("text_config", config)
        for flag, what in (
            ("enable_moe_block", "the mixture-of-experts variant (26B-A4B)"),
            ("attention_k_eq_v", "keys used as values (31B)"),
            ("attn_logit_softcapping", "attention soft-capping"),
        ):
            if text.get(flag):
                raise UnsupportedError(f"gemma4: {what} is not supported yet")
        if text.get("use_bidirectional_attention") == "all":
            raise UnsupportedError("gemma4 with bidirectional attention is not a causal LM")
        if text.get("attention_bias"):
            raise UnsupportedError("gemma4 with attention biases is not supported")
        activation = text.get("hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise UnsupportedError(
                f"gemma4 with the {activation!r} activation is not supported (gelu_pytorch_tanh)"
            )
        for layer, override in (text.get("per_layer_config") or {}).items():
            other = set(override) - {"head_dim"} if isinstance(override, dict) else {"?"}
            if other:
                raise UnsupportedError(
                    f"gemma4 layer {layer} overrides {sorted(other)}; only head_dim is supported"
                )
        super().__init__(text)
        self.layer_types = list(text["layer_types"])
        self.first_shared = self.n_layers - int(text.get("num_kv_shared_layers") or 0)
        self.global_head_dim = self._global_head_dim(text)

    def _global_head_dim(self, c: dict) -> int:
        per_layer = c.get("per_layer_config") or {}
        dims = {
            int(v["head_dim"])
            for k, v in per_layer.items()
            if isinstance(v, dict) and "head_dim" in v and self.layer_types[int(k)] == "full_attention"
        }
        if len(dims) > 1:
            raise UnsupportedError(f"gemma4: full-attention layers with different head sizes {sorted(dims)}")
        if dims:
            return dims.pop()
        return int(c.get("global_head_dim") or 512)  # transformers' default

    def _ffn(self) -> list[int] | int:
        c = self.config
        width = int(c["intermediate_size"])
        if not c.get("use_double_wide_mlp"):
            return width
        return [width * (2 if i >= self.first_shared else 1) for i in range(self.n_layers)]

    def _rope_factors(self) -> np.ndarray | None:
        full = rope_parameters(self.config, "full_attention")
        if full["rope_type"] == "default":
            return None
        if full["rope_type"] != "proportional":
            raise UnsupportedError(
                f"gemma4 rope_type {full['rope_type']!r} is not supported (default, proportional)"
            )
        half = self.global_head_dim // 2
        rotated = int(float(full["partial_rotary_factor"]) * self.global_head_dim // 2)
        factor = float(full.get("factor", 1.0))  # transformers divides the rotated frequencies by it
        return np.array([factor] * rotated + [1e30] * (half - rotated), np.float32)

    def metadata(self):
        c = self.config
        keys = super().metadata()
        full, sliding = rope_parameters(c, "full_attention"), rope_parameters(c, "sliding_attention")
        if sliding["rope_type"] != "default":
            raise UnsupportedError(
                f"gemma4 sliding-layer rope_type {sliding['rope_type']!r} is not supported"
            )
        keys.update(
            {
                "feed_forward_length": self._ffn(),
                "attention.key_length": self.global_head_dim,
                "attention.value_length": self.global_head_dim,
                "attention.key_length_swa": self.head_dim,
                "attention.value_length_swa": self.head_dim,
                "rope.freq_base": float(full["rope_theta"]),
                "rope.freq_base_swa": float(sliding["rope_theta"]),
                "rope.dimension_count": self.global_head_dim,
                "rope.dimension_count_swa": self.head_dim,
                "attention.sliding_window": int(c["sliding_window"]),
                "attention.sliding_window_pattern": [t == "sliding_attention" for t in self.layer_types],
                "attention.shared_kv_layers": self.n_layers - self.first_shared,
                "embedding_length_per_layer_input": int(c.get("hidden_size_per_layer_input") or 0),
            }
        )
        if c.get("final_logit_softcapping"):
            keys["final_logit_softcapping"] = float(c["final_logit_softcapping"])
        return keys

    def tensors(self, ckpt):
        for name in ckpt.names:
            short = name.replace("model.language_model.", "model.", 1)
            gguf_name = self.map_name(short if short.endswith((".weight", ".bias")) else short + ".weight")
            if gguf_name is None:
                continue
            parts = gguf_name.split(".")
            if (
                parts[0] == "blk"
                and int(parts[1]) >= self.first_shared
                and parts[2] in ("attn_k", "attn_v", "attn_k_norm")
            ):
                continue  # a KV-sharing layer's own keys and values: never read
            yield gguf_name, ckpt.shape(name), lambda n=name: ckpt.tensor(n)
        factors = self._rope_factors()
        if factors is not None:
            yield "rope_freqs.weight", factors.shape, lambda: factors
