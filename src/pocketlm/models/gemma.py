"""Gemma (1): Llama-shaped blocks with GeGLU (tanh GELU), (1 + w) RMSNorm (stored with the 1
added), embeddings scaled by sqrt(hidden), tied output, head_dim 256, multi-query attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Attention, CausalLM, DecoderArgs, GatedMLP, Norm, Weights


@dataclass
class GemmaArgs(DecoderArgs):
    head_dim: int = 256
    norm_eps: float = 1e-6
    context_length: int = 8192


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: GemmaArgs):
        spec = args.attention_spec()
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "rms", args.norm_eps)
        self.ffn_norm = Norm(w, f"blk.{i}.ffn_norm", "rms", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = GatedMLP(w, f"blk.{i}", "gelu_tanh")

    def __call__(self, ops, x, positions, cache):
        x = x + self.attention(ops, self.attn_norm(ops, x), positions, cache)
        return x + self.mlp(ops, self.ffn_norm(ops, x))


class Model(CausalLM):
    def __init__(self, args: GemmaArgs, w: Weights):
        self.args = args
        self.init_io(w, "rms", args.norm_eps)
        self.layers = [TransformerBlock(w, i, args) for i in range(args.n_layers)]
        self.embed_scale = math.sqrt(args.hidden_size)


ARGS = GemmaArgs
