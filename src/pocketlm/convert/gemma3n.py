"""Gemma 3n's text decoder -> llama.cpp's `gemma3n` names and keys, optionally sliced to a smaller
nested model first (MatFormer "mix-n-match": skip whole layers, narrow each kept layer's FFN).

    Gemma3nMapping(config, MatFormerSlice(layers_to_skip=[20, 21, 22, 23, 24], ffn_dims=[8192] * 30))
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from ..errors import InvalidOptionError, UnsupportedError
from .architectures import _LLAMA_NAMES, Mapping, RowLoader, register, rope_parameters

# Google's published configurations of an E4B checkpoint (MatFormer Lab); the official E2B is
# the E4B with layers 20-24 skipped and an 8192-wide FFN in the 30 that remain.
PRESETS = {"e2b": {"layers_to_skip": [20, 21, 22, 23, 24], "ffn_dims": [8192] * 30}}


@dataclass(frozen=True)
class MatFormerSlice:
    layers_to_skip: tuple[int, ...] = ()
    ffn_dims: tuple[int, ...] | None = None  # one width per kept layer; None keeps each layer's

    @classmethod
    def parse(cls, spec: str) -> MatFormerSlice:
        """A preset name, a JSON object, or a JSON file, with `layers_to_skip` and `ffn_dims`."""
        if spec.lower() in PRESETS:
            values = PRESETS[spec.lower()]
        else:
            text = (
                Path(spec).read_text(encoding="utf-8")
                if spec.endswith(".json") and Path(spec).is_file()
                else spec
            )
            try:
                values = json.loads(text)
            except json.JSONDecodeError:
                raise InvalidOptionError(
                    f"--matformer must be a preset ({', '.join(PRESETS)}), a JSON object or a .json file, got {spec!r}"
                ) from None
        unknown = set(values) - {"layers_to_skip", "ffn_dims"}
        if not isinstance(values, dict) or unknown:
            raise InvalidOptionError(
                f"--matformer takes the keys layers_to_skip and ffn_dims (unknown: {sorted(unknown)})"
            )
        dims = values.get("ffn_dims")
        return cls(
            tuple(int(i) for i in values.get("layers_to_skip", ())),
            tuple(int(d) for d in dims) if dims else None,
        )

    def apply(self, config: dict) -> tuple[dict, list[int]]:
        """The sliced text config and the old index of each kept layer."""
        n = int(config["num_hidden_layers"])
        bad = [i for i in self.layers_to_skip if not 0 <= i < n]
        if bad:
            raise InvalidOptionError(f"--matformer skips layers {bad}, but the model has layers 0..{n - 1}")
        kept = [i for i in range(n) if i not in self.layers_to_skip]
        first_shared = n - int(config.get("num_kv_shared_layers", 0))
        types = list(config["layer_types"])
        sources = {max(j for j in range(first_shared) if types[j] == t) for t in set(types[first_shared:])}
        if sources & set(self.layers_to_skip):
            raise InvalidOptionError(
                f"--matformer cannot skip layers {sorted(sources)}: later layers reuse their keys and values"
            )
        widths = _per_layer(config["intermediate_size"], n)
        dims = list(self.ffn_dims) if self.ffn_dims else [widths[i] for i in kept]
        if len(dims) != len(kept):
            raise InvalidOptionError(
                f"--matformer gives {len(dims)} FFN widths for the {len(kept)} kept layers"
            )
        too_wide = [(i, d) for i, d in zip(kept, dims) if d > widths[i]]
        if too_wide:
            raise InvalidOptionError(
                f"--matformer widths exceed the checkpoint's FFN (layer, width): {too_wide}"
            )
        sliced = dict(
            config,
            num_hidden_layers=len(kept),
            intermediate_size=dims,
            layer_types=[types[i] for i in kept],
            num_kv_shared_layers=sum(1 for i in kept if i >= first_shared),
            activation_sparsity_pattern=[
                _per_layer(config.get("activation_sparsity_pattern"), n)[i] for i in kept
            ],
        )
        return sliced, kept


def _per_layer(value, n: int) -> list:
    if value is None:
        return [0.0] * n
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


_NAMES = {
    **_LLAMA_NAMES,
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.post_attention_norm",
    "model.layers.{i}.pre_feedforward_layernorm": "blk.{i}.ffn_norm",
    "model.layers.{i}.post_feedforward_layernorm": "blk.{i}.post_ffw_norm",
    "model.embed_tokens_per_layer": "per_layer_token_embd",
    "model.per_layer_model_projection": "per_layer_model_proj",
    "model.per_layer_projection_norm": "per_layer_proj_norm",
    "model.layers.{i}.per_layer_input_gate": "blk.{i}.inp_gate",
    "model.layers.{i}.per_layer_projection": "blk.{i}.proj",
    "model.layers.{i}.post_per_layer_input_norm": "blk.{i}.post_norm",
    "model.layers.{i}.altup.correction_coefs": "blk.{i}.altup_correct_coef",
    "model.layers.{i}.altup.correct_output_scale": "blk.{i}.altup_correct_scale",
    "model.layers.{i}.altup.prediction_coefs": "blk.{i}.altup_predict_coef",
    "model.layers.{i}.altup.modality_router": "blk.{i}.altup_router",
    "model.layers.{i}.altup.router_norm": "blk.{i}.altup_router_norm",
    "model.layers.{i}.laurel.linear_left": "blk.{i}.laurel_l",
    "model.layers.{i}.laurel.linear_right": "blk.{i}.laurel_r",
    "model.layers.{i}.laurel.post_laurel_norm": "blk.{i}.laurel_post_norm",
    "model.layers.{i}.self_attn.v_norm": "blk.{i}.attn_v_norm",  # has no weight; never in a checkpoint
}
_STACKED = re.compile(r"^model\.(altup_projections|altup_unembed_projections)\.(\d+)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@register("gemma3n", "gemma3n_text")
class Gemma3nMapping(Mapping):
    arch = "gemma3n"
    names = _NAMES

    def __init__(self, config, matformer: MatFormerSlice | None = None):
        text = config.get("text_config", config)
        self.kept = list(range(int(text["num_hidden_layers"])))
        if matformer is not None:
            text, self.kept = matformer.apply(text)
        super().__init__(text)
        per_layer = int(text["hidden_size_per_layer_input"])  # the kept layers' columns of the PLE tensors
        self.ple_columns = np.concatenate([np.arange(i * per_layer, (i + 1) * per_layer) for i in self.kept])

    def metadata(self):
        c = self.config
        keys = super().metadata()
        keys["feed_forward_length"] = [int(d) for d in _per_layer(c["intermediate_size"], self.n_layers)]
        full, sliding = rope_parameters(c, "full_attention"), rope_parameters(c, "sliding_attention")
        keys["rope.freq_base"] = float(full["rope_theta"])
        keys["rope.freq_base_swa"] = float(sliding["rope_theta"])
        keys["attention.sliding_window"] = int(c["sliding_window"])
        keys["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c["layer_types"]]
        if c.get("final_logit_softcapping"):
            keys["final_logit_softcapping"] = float(c["final_logit_softcapping"])
        if int(c.get("altup_num_inputs", 4)) < 2:
            raise UnsupportedError("gemma3n with fewer than 2 AltUp inputs is not supported")
        keys["altup.active_idx"] = int(c.get("altup_active_idx", 0))
        keys["altup.num_inputs"] = int(c.get("altup_num_inputs", 4))
        keys["embedding_length_per_layer_input"] = int(c["hidden_size_per_layer_input"])
        keys["attention.shared_kv_layers"] = int(c.get("num_kv_shared_layers", 0))
        # the cut-off is mean + std * Phi^-1(sparsity); 0 sparsity gives -inf, no cut-off (as llama.cpp stores it)
        keys["activation_sparsity_scale"] = [
            NormalDist().inv_cdf(p) if p > 0 else -math.inf
            for p in _per_layer(c.get("activation_sparsity_pattern"), self.n_layers)
        ]
        if c.get("altup_coef_clip"):
            keys["pocketlm.altup.coef_clip"] = float(c["altup_coef_clip"])
        if keys["altup.active_idx"] != 0:
            raise UnsupportedError("gemma3n with altup_active_idx other than 0 is not supported")
        return keys

    def tensors(self, ckpt):
        new_index = {old: new for new, old in enumerate(self.kept)}
        written: set[str] = set()
        stacked: dict[str, list[tuple[int, str]]] = {}
        for name in ckpt.names:
            short = name.replace("model.language_model.", "model.", 1)
            if any(part in short for part in self.skip_parts) or not short.startswith("model."):
                continue
            if match := _STACKED.match(short):
                stacked.setdefault(match[1], []).append((int(match[2]), name))
                continue
            if layer := _LAYER.match(short):
                if int(layer[1]) not in new_index:
                    continue
                short = f"model.layers.{new_index[int(layer[1])]}.{short[layer.end() :]}"
            gguf_name = self.map_name(short if short.endswith((".weight", ".bias")) else short + ".weight")
            if gguf_name is not None:
                written.add(gguf_name)
                yield gguf_name, *self._sliced(ckpt, name, gguf_name)
        yield from self._unused_kv(written)
        for part, gguf_name in (
            ("altup_projections", "altup_proj.weight"),
            ("altup_unembed_projections", "altup_unembd_proj.weight"),
        ):
            names = [n for _, n in sorted(stacked.get(part, []))]
            if names:
                shape = (len(names), *ckpt.shape(names[0]))
                yield gguf_name, shape, lambda names=names: np.stack([ckpt.tensor(n) for n in names])

    def _unused_kv(self, written: set[str]):
        """Zeros for the key/value weights of KV-sharing layers where the checkpoint has none
        (transformers drops them): they are never used, but llama.cpp's loader requires them."""
        kv_size, hidden = self.n_kv_heads * self.head_dim, int(self.config["hidden_size"])
        first_shared = self.n_layers - int(self.config.get("num_kv_shared_layers", 0))
        for i in range(first_shared, self.n_layers):
            for name, shape in (
                (f"blk.{i}.attn_k.weight", (kv_size, hidden)),
                (f"blk.{i}.attn_v.weight", (kv_size, hidden)),
                (f"blk.{i}.attn_k_norm.weight", (self.head_dim,)),
            ):
                if name not in written:
                    yield name, shape, lambda shape=shape: np.zeros(shape, np.float32)

    def _sliced(self, ckpt, name: str, gguf_name: str):
        """(shape, loader) of a tensor after the MatFormer slice: narrower FFN matrices, and the
        kept layers' parts of the per-layer projection and table."""
        shape = ckpt.shape(name)
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
        width = (
            _per_layer(self.config["intermediate_size"], self.n_layers)[layer] if layer is not None else None
        )
        cols = self.ple_columns
        if gguf_name.endswith((".ffn_gate.weight", ".ffn_up.weight")) and shape[0] != width:
            return (width, shape[1]), lambda: ckpt.tensor(name)[:width]
        if gguf_name.endswith(".ffn_down.weight") and shape[1] != width:
            return (shape[0], width), lambda: np.ascontiguousarray(ckpt.tensor(name)[:, :width])
        if gguf_name == "per_layer_model_proj.weight" and shape[0] != len(cols):
            return (len(cols), shape[1]), lambda: ckpt.tensor(name)[cols]
        if gguf_name == "per_layer_token_embd.weight":  # billions of values: read by bands of rows
            return (shape[0], len(cols)), RowLoader(
                lambda: np.ascontiguousarray(ckpt.tensor(name)[:, cols]),
                lambda a, b: np.ascontiguousarray(ckpt.rows(name, a, b)[:, cols]),
            )
        return shape, lambda: ckpt.tensor(name)
