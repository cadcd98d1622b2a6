"""Llama family (Llama 2/3, SmolLM2): pre-norm blocks, SwiGLU MLP, RoPE, grouped-query attention.

llama.cpp's converter permutes the q/k rows of Llama checkpoints so that RoPE rotates adjacent
pairs; GGUF files of this architecture therefore use the non-NeoX rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Attention, AttentionSpec, CausalLM, DecoderArgs, GatedMLP, Weights


@dataclass
class LlamaArgs(DecoderArgs):
    rope_dims: int | None = None

    _keys = {**DecoderArgs._keys, "rope_dims": "rope.dimension_count"}


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: LlamaArgs):
        head_dim = args.head_dim or args.hidden_size // args.n_heads
        spec = AttentionSpec(
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads or args.n_heads, head_dim=head_dim,
            rope_base=args.rope_base, rope_dims=args.rope_dims or head_dim, rope_neox=False,
            scale=head_dim**-0.5,
        )
        self.attn_norm, self.ffn_norm = w(f"blk.{i}.attn_norm.weight"), w(f"blk.{i}.ffn_norm.weight")
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = GatedMLP(w, f"blk.{i}", "silu")
        self.eps = args.norm_eps

    def __call__(self, ops, x, positions, cache):
        x = x + self.attention(ops, ops.rms_norm(x, self.attn_norm, self.eps), positions, cache)
        return x + self.mlp(ops, ops.rms_norm(x, self.ffn_norm, self.eps))


class Model(CausalLM):
    def __init__(self, args: LlamaArgs, w: Weights):
        self.args = args
        self.token_embd = w("token_embd.weight")
        self.layers = [TransformerBlock(w, i, args) for i in range(args.n_layers)]
        self.output_norm = w("output_norm.weight")
        self.output = w.optional("output.weight") or self.token_embd  # tied when absent
        self.vocab_size = self.token_embd.shape[0]

    def embed(self, ops, ids: np.ndarray) -> np.ndarray:
        return ops.embedding(self.token_embd, ids)

    def head(self, ops, h: np.ndarray) -> np.ndarray:
        return ops.linear(ops.rms_norm(h, self.output_norm, self.args.norm_eps), self.output)


ARGS = LlamaArgs
