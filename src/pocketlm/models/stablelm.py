"""StableLM (2): LayerNorm, partial rotary embeddings (NeoX), SwiGLU, optional q/k/v biases, and
two features by flag (`pocketlm.attention.qk_norm`, `pocketlm.parallel_residual`; in files without
them llama.cpp's rule: the q/k norm and ffn_norm tensors' presence)."""

from __future__ import annotations

from ..errors import ModelFileError
from .base import Attention, CausalLM, GatedMLP, LayerNormArgs, Norm, Weights, feature


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: LayerNormArgs):
        qk_norm = feature(args.qk_norm, w, f"blk.{i}.attn_q_norm.weight")
        spec = args.attention_spec(qk_norm="layer" if qk_norm else None)
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "layer", args.norm_eps)
        sequential = args.parallel_residual is False if args.parallel_residual is not None else None
        if feature(sequential, w, f"blk.{i}.ffn_norm.weight"):
            self.ffn_norm = Norm(w, f"blk.{i}.ffn_norm", "layer", args.norm_eps)
        elif w.optional(f"blk.{i}.ffn_norm.weight") is not None:
            raise ModelFileError(
                f"tensor 'blk.{i}.ffn_norm.weight' is not part of a parallel-residual StableLM"
            )
        else:
            self.ffn_norm = None
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
    norm_type = "layer"


ARGS = LayerNormArgs
