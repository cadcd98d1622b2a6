"""StableLM (2): LayerNorm, partial rotary embeddings (NeoX), SwiGLU, optional q/k/v biases and
per-head q/k LayerNorm, and an optional parallel residual (the file then has no ffn_norm)."""

from __future__ import annotations

from .base import Attention, CausalLM, GatedMLP, LayerNormArgs, Norm, Weights


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: LayerNormArgs):
        spec = args.attention_spec(qk_norm="layer")
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "layer", args.norm_eps)
        parallel = w.optional(f"blk.{i}.ffn_norm.weight") is None
        self.ffn_norm = None if parallel else Norm(w, f"blk.{i}.ffn_norm", "layer", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = GatedMLP(w, f"blk.{i}", "silu")

    def __call__(self, ops, x, positions, cache):
        h = self.attn_norm(ops, x)
        if self.ffn_norm is None:  # parallel residual: attention and MLP read the same input
            return x + self.attention(ops, h, positions, cache) + self.mlp(ops, h)
        x = x + self.attention(ops, h, positions, cache)
        return x + self.mlp(ops, self.ffn_norm(ops, x))


class Model(CausalLM):
    block = TransformerBlock
    norm_kind = "layer"


ARGS = LayerNormArgs
