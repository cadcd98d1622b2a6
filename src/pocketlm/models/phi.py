"""Phi-2 (GGUF architecture "phi2"): one LayerNorm feeds attention and MLP in parallel, partial
rotary embeddings (NeoX), GELU (tanh) MLP, biases everywhere, untied output with a bias."""

from __future__ import annotations

from .base import MLP, Attention, CausalLM, LayerNormArgs, Norm, Weights, feature


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: LayerNormArgs):
        qk_norm = feature(args.qk_norm, w, f"blk.{i}.attn_q_norm.weight")
        spec = args.attention_spec(qk_norm="layer" if qk_norm else None)
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "layer", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = MLP(w, f"blk.{i}", "gelu_tanh")

    def __call__(self, ops, x, positions, cache):
        h = self.attn_norm(ops, x)
        return x + self.attention(ops, h, positions, cache) + self.mlp(ops, h)


class Model(CausalLM):
    block = TransformerBlock
    norm_type = "layer"


ARGS = LayerNormArgs
