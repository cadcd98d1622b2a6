"""Llama family (Llama 2/3, SmolLM2): pre-norm blocks, SwiGLU MLP, RoPE, grouped-query attention,
optional attention / MLP biases and Llama 3 RoPE scaling (llama.cpp's rope_freqs tensor).

llama.cpp's converter permutes the q/k rows of Llama checkpoints so that RoPE rotates adjacent
pairs; GGUF files of this architecture therefore use the non-NeoX rotation. Qwen 2/3 reuse these
blocks with the NeoX rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Attention, AttentionSpec, CausalLM, DecoderArgs, GatedMLP, Norm, Weights


@dataclass
class LlamaArgs(DecoderArgs):
    rope_dims: int | None = None

    _keys = {**DecoderArgs._keys, "rope_dims": "rope.dimension_count"}


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: LlamaArgs, rope_neox: bool):
        head_dim = args.head_dim or args.hidden_size // args.n_heads
        spec = AttentionSpec(
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads or args.n_heads, head_dim=head_dim,
            rope_base=args.rope_base, rope_dims=args.rope_dims or head_dim, rope_neox=rope_neox,
            scale=head_dim**-0.5,
        )
        self.attn_norm = Norm(w, f"blk.{i}.attn_norm", "rms", args.norm_eps)
        self.ffn_norm = Norm(w, f"blk.{i}.ffn_norm", "rms", args.norm_eps)
        self.attention = Attention(w, f"blk.{i}", spec, args.norm_eps)
        self.mlp = GatedMLP(w, f"blk.{i}", "silu")

    def __call__(self, ops, x, positions, cache):
        x = x + self.attention(ops, self.attn_norm(ops, x), positions, cache)
        return x + self.mlp(ops, self.ffn_norm(ops, x))


class Model(CausalLM):
    rope_neox = False

    def __init__(self, args: LlamaArgs, w: Weights):
        self.args = args
        self.init_io(w, "rms", args.norm_eps)
        self.layers = [TransformerBlock(w, i, args, self.rope_neox) for i in range(args.n_layers)]


ARGS = LlamaArgs
