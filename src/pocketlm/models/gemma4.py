"""Gemma 4's text decoder (E2B / E4B): Gemma's sandwich-normed blocks on one residual stream,
per-layer embeddings (PLE), KV sharing, sliding and full layers with their own head sizes,
proportional partial RoPE on the full layers, a double-wide FFN in the KV-sharing layers, a
learned scalar on every layer's output, final soft-capping.

Each layer receives its slice of the per-layer input: its part of a row of the per-layer
embedding table (which stays in the file and is read per token, see `streamed`) mixed with its
part of a projection of the token embedding, both read through the op set (no numpy on
activations: the GPU backend runs it too); after the FFN it is gated by the hidden state and added to it. The last
`shared_kv_layers` layers compute no keys and values: each attends over those of the last earlier
layer of its kind. Attention scale is 1 (the q / k norms carry it); norms multiply by w itself
(no 1 + w); the value norm has no weight. Tensor and key names follow llama.cpp's `gemma4`; the
full layers' partial rotation comes as llama.cpp's `rope_freqs` (1 for rotated frequencies,
1e30 for the others, which then never turn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kvcache import KVCache, LayerCache
from .base import REQUIRED, Norm, Weights
from .gemma3 import Gemma3Args
from .gemma3n import PER_LAYER_TABLE, Attention, PerLayerInputs, kv_sharing_cache, shared_kv_source


@dataclass
class Gemma4Args(Gemma3Args):
    head_dim_swa: int = REQUIRED  # the sliding layers' head size (head_dim: the full layers')
    rope_dims_swa: int | None = None
    per_layer_dim: int = 0
    shared_kv_layers: int = 0

    _keys = {
        **Gemma3Args._keys,
        "head_dim_swa": "attention.key_length_swa",
        "rope_dims_swa": "rope.dimension_count_swa",
        "per_layer_dim": "embedding_length_per_layer_input",
        "shared_kv_layers": "attention.shared_kv_layers",
    }
    _positive = Gemma3Args._positive | {"head_dim_swa"}
    _per_layer = frozenset({"ffn_size"})  # the KV-sharing layers' FFN may be twice as wide

    def kv_source(self, i: int) -> int | None:
        return shared_kv_source(self, i)


class Block:
    def __init__(self, w: Weights, i: int, args: Gemma4Args):
        sliding = args.is_sliding(i)
        head_dim = args.head_dim_swa if sliding else args.head_dim
        spec = args.attention_spec(
            head_dim=head_dim,
            rope_base=args.rope_base_swa if sliding else args.rope_base,
            rope_dims=(args.rope_dims_swa if sliding else args.rope_dims) or head_dim,
            scale=1.0,
            window=args.sliding_window if sliding else None,
        )
        p, eps = f"blk.{i}", args.norm_eps
        self.kv_source = args.kv_source(i)
        factors = None if sliding else w.optional("rope_freqs.weight")
        self.attention = Attention(w, p, spec, eps, self.kv_source is not None, factors)
        self.attn_norm, self.post_attn_norm, self.ffn_norm, self.post_ffn_norm = (
            Norm(w, f"{p}.{n}", "rms", eps)
            for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")
        )
        self.gate, self.up, self.down = (w(f"{p}.ffn_{n}.weight") for n in ("gate", "up", "down"))
        self.per_layer = args.per_layer_dim > 0
        if self.per_layer:
            self.ple_gate, self.ple_proj = w(f"{p}.inp_gate.weight"), w(f"{p}.proj.weight")
            self.ple_norm = Norm(w, f"{p}.post_norm", "rms", eps)
        self.output_scale = w.optional(f"{p}.layer_output_scale.weight")

    def __call__(self, ops, h, per_layer, positions, cache):
        """`per_layer`: this layer's per-layer input [T, P], or None when the model has none."""
        h = h + self.post_attn_norm(ops, self.attention(ops, self.attn_norm(ops, h), positions, cache))
        gate, up = ops.linears(self.ffn_norm(ops, h), [self.gate, self.up], [None, None])
        h = h + self.post_ffn_norm(ops, ops.linear(ops.gelu_tanh(gate) * up, self.down))
        if self.per_layer:  # the per-layer input, gated by the hidden state itself
            gated = ops.gelu_tanh(ops.linear(h, self.ple_gate)) * per_layer
            h = h + self.ple_norm(ops, ops.linear(gated, self.ple_proj))
        if self.output_scale is not None:
            h = h * float(ops.dense(self.output_scale).reshape(-1)[0])
        return h


class Model:
    """Satisfies the engine's contract (`make_cache`, `forward`, `vocab_size`, `args`)."""

    # Tensors the runtime leaves in the file and reads row by row (never made resident).
    streamed = frozenset({PER_LAYER_TABLE})

    def __init__(self, args: Gemma4Args, w: Weights):
        self.args = args
        self.token_embd = w("token_embd.weight")
        self.per_layer = PerLayerInputs(w, args) if args.per_layer_dim else None
        self.output_norm = Norm(w, "output_norm", "rms", args.norm_eps)
        output = w.optional("output.weight")
        self.output = output if output is not None else self.token_embd
        self.vocab_size = self.token_embd.shape[0]
        self.layers = [Block(w, i, args) for i in range(args.n_layers)]

    def make_cache(self, max_tokens: int, layer_cache=LayerCache) -> KVCache:
        return kv_sharing_cache(self.layers, max_tokens, layer_cache)

    def forward(self, ops, ids: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        positions = np.arange(cache.offset, cache.offset + len(ids))
        ids = np.asarray(ids, np.int64)
        h = ops.embedding(self.token_embd, ids) * np.float32(math.sqrt(self.args.hidden_size))
        embedded = h
        for i, layer in enumerate(self.layers):
            per_layer = self.per_layer(ops, i, ids, embedded) if self.per_layer else None
            h = layer(ops, h, per_layer, positions, cache[i])
        cache.offset += len(ids)
        if not all_logits:
            h = h[-1:]
        logits = ops.linear(self.output_norm(ops, h), self.output)
        return ops.softcap(logits, self.args.final_softcap) if self.args.final_softcap else logits


ARGS = Gemma4Args
