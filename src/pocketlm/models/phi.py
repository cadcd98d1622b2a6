"""Phi-2 (GGUF architecture "phi2"): one LayerNorm feeds attention and MLP in parallel, partial
rotary embeddings (NeoX), GELU (tanh) MLP, biases everywhere, untied output with a bias."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MLP, Attention, AttentionSpec, CausalLM, DecoderArgs, Norm, Weights


@dataclass
class PhiArgs(DecoderArgs):
    rope_dims: int | None = None

    _keys = {**DecoderArgs._keys, "rope_dims": "rope.dimension_count", "norm_eps": "attention.layer_norm_epsilon"}


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: PhiArgs):
        head_dim = args.head_dim or args.hidden_size // args.n_heads
        spec = AttentionSpec(
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads or args.n_heads, head_dim=head_dim,
            rope_base=args.rope_base, rope_dims=args.rope_dims or head_dim, rope_neox=True,
            scale=head_dim**-0.5, qk_norm="layer",
        )
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "layer", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = MLP(w, f"blk.{i}", "gelu_tanh")

    def __call__(self, ops, x, positions, cache):
        h = self.attn_norm(ops, x)
        return x + self.attention(ops, h, positions, cache) + self.mlp(ops, h)


class Model(CausalLM):
    def __init__(self, args: PhiArgs, w: Weights):
        self.args = args
        self.init_io(w, "layer", args.norm_eps)
        self.layers = [TransformerBlock(w, i, args) for i in range(args.n_layers)]


ARGS = PhiArgs
