"""Falcon, both generations:
- falcon-rw (e.g. falcon-rw-1b): ALiBi instead of RoPE, multi-head attention, sequential
  blocks (a second LayerNorm, stored as ffn_norm, before the MLP);
- falcon-7b/40b style: RoPE (NeoX), multi-query or grouped attention, parallel attention and
  MLP fed by one LayerNorm (attn_norm) or two (llama.cpp's names: attn_norm_2 before attention,
  attn_norm before the MLP).
q, k and v come fused as attn_qkv in [all q; all k; all v] order (the converter reorders them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MLP, Attention, AttentionSpec, CausalLM, DecoderArgs, Norm, Weights, alibi_slopes


@dataclass
class FalconArgs(DecoderArgs):
    max_alibi_bias: float | None = None  # present: ALiBi with this maximum bias, no RoPE

    _keys = {**DecoderArgs._keys, "norm_eps": "attention.layer_norm_epsilon",
             "max_alibi_bias": "attention.max_alibi_bias"}


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: FalconArgs):
        head_dim = args.head_dim or args.hidden_size // args.n_heads
        scale = head_dim**-0.5
        # transformers adds the ALiBi bias before the 1/sqrt(head_dim) scaling
        alibi = alibi_slopes(args.n_heads, args.max_alibi_bias) * scale if args.max_alibi_bias else None
        spec = AttentionSpec(
            n_heads=args.n_heads, n_kv_heads=args.n_kv_heads or args.n_heads, head_dim=head_dim,
            rope_base=args.rope_base, rope_dims=0 if alibi is not None else head_dim, rope_neox=True,
            scale=scale, alibi=alibi,
        )
        p, eps = f"blk.{i}", args.norm_eps
        self.attn_norm = Norm(w, f"{p}.attn_norm", "layer", eps)
        has = lambda name: w.optional(f"{p}.{name}.weight") is not None  # noqa: E731
        self.attn_norm_2 = Norm(w, f"{p}.attn_norm_2", "layer", eps) if has("attn_norm_2") else None
        self.ffn_norm = Norm(w, f"{p}.ffn_norm", "layer", eps) if has("ffn_norm") else None
        self.attention = Attention(w, p, spec, eps)
        self.mlp = MLP(w, p, "gelu")

    def __call__(self, ops, x, positions, cache):
        h = self.attn_norm(ops, x)
        h_attn = self.attn_norm_2(ops, x) if self.attn_norm_2 is not None else h
        attn = self.attention(ops, h_attn, positions, cache)
        if self.ffn_norm is not None:  # sequential (falcon-rw)
            x = x + attn
            return x + self.mlp(ops, self.ffn_norm(ops, x))
        return x + attn + self.mlp(ops, h)


class Model(CausalLM):
    def __init__(self, args: FalconArgs, w: Weights):
        self.args = args
        self.init_io(w, "layer", args.norm_eps)
        self.layers = [TransformerBlock(w, i, args) for i in range(args.n_layers)]


ARGS = FalconArgs
