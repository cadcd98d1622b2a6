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

from ..backends.base import EXACT_GELU
from ..errors import ModelFileError
from .base import MLP, Attention, CausalLM, LayerNormArgs, Norm, Weights, alibi_slopes, feature


@dataclass
class FalconArgs(LayerNormArgs):
    max_alibi_bias: float | None = None  # present: ALiBi with this maximum bias, no RoPE

    _keys = {**LayerNormArgs._keys, "max_alibi_bias": "attention.max_alibi_bias"}


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: FalconArgs):
        spec = args.attention_spec()
        if args.max_alibi_bias:  # transformers adds ALiBi's bias before the 1/sqrt(head_dim) scaling
            spec.alibi, spec.rope_dims = alibi_slopes(args.n_heads, args.max_alibi_bias) * spec.scale, 0
        p, eps = f"blk.{i}", args.norm_eps
        self.attn_norm = Norm(w, f"{p}.attn_norm", "layer", eps)
        has = lambda name: w.optional(f"{p}.{name}.weight") is not None  # noqa: E731
        self.attn_norm_2 = Norm(w, f"{p}.attn_norm_2", "layer", eps) if has("attn_norm_2") else None
        # sequential (falcon-rw) or parallel: our converter's `pocketlm.parallel_residual` says which
        # (the norm is then required or refused); other files, by the norm's presence
        sequential = args.parallel_residual is False if args.parallel_residual is not None else None
        if feature(sequential, w, f"{p}.ffn_norm.weight"):
            self.ffn_norm = Norm(w, f"{p}.ffn_norm", "layer", eps)
        elif has("ffn_norm"):
            raise ModelFileError(f"tensor '{p}.ffn_norm.weight' is not part of a parallel Falcon block")
        else:
            self.ffn_norm = None
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
    block = TransformerBlock
    norm_type = "layer"
    requires = frozenset({EXACT_GELU})


ARGS = FalconArgs
