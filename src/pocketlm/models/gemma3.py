"""Gemma 3 (incl. 270M): sliding-window and global layers with their own RoPE bases, per-head
q/k RMSNorm, norms before and after attention and MLP, GeGLU, scaled tied embeddings.
Gemma 2 uses the same blocks (see gemma2.py).

As in llama.cpp's files, Gemma's (1 + w) norm weights are stored with the 1 already added, so
every norm here multiplies by the stored weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Attention, CausalLM, DecoderArgs, GatedMLP, Norm, Weights


@dataclass
class Gemma3Args(DecoderArgs):
    qk_norm = "rms"  # of the architecture (Gemma 2 has none), not of the file: not a field
    head_dim: int = 256
    rope_base: float = 1_000_000.0
    rope_base_swa: float = 10_000.0
    rope_scale: float = 1.0  # linear RoPE scaling of the global layers
    sliding_window: int | None = None
    sliding_pattern: object = None  # per-layer booleans; absent: 5 sliding then 1 global
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    norm_eps: float = 1e-6
    context_length: int = 32768

    _positive = DecoderArgs._positive | {"rope_base_swa"}
    _keys = {
        **DecoderArgs._keys,
        "rope_base_swa": "rope.freq_base_swa",
        "rope_scale": "rope.scaling.factor",
        "sliding_window": "attention.sliding_window",
        "sliding_pattern": "attention.sliding_window_pattern",
        "query_pre_attn_scalar": "pocketlm.attention.query_pre_attn_scalar",  # llama.cpp assumes head_dim
        "attn_softcap": "attn_logit_softcapping",
        "final_softcap": "final_logit_softcapping",
    }
    default_period = 6  # without a pattern in the file: every 6th layer is global

    def is_sliding(self, i: int) -> bool:
        if not self.sliding_window:
            return False
        if self.sliding_pattern is None:
            return i % self.default_period < self.default_period - 1
        return bool(self.sliding_pattern[i])


class TransformerBlock:
    def __init__(self, w: Weights, i: int, args: Gemma3Args):
        sliding = args.is_sliding(i)
        spec = args.attention_spec(
            rope_base=args.rope_base_swa if sliding else args.rope_base,
            scale=(args.query_pre_attn_scalar or args.head_dim) ** -0.5,
            window=args.sliding_window if sliding else None,
            softcap=args.attn_softcap,
            rope_freq_scale=1.0 if sliding else 1.0 / args.rope_scale,
            qk_norm=args.qk_norm,
        )
        p, eps = f"blk.{i}", args.norm_eps
        self.attn_norm, self.post_attn_norm = (
            Norm(w, f"{p}.attn_norm", "rms", eps),
            Norm(w, f"{p}.post_attention_norm", "rms", eps),
        )
        self.ffn_norm, self.post_ffn_norm = (
            Norm(w, f"{p}.ffn_norm", "rms", eps),
            Norm(w, f"{p}.post_ffw_norm", "rms", eps),
        )
        self.attention = Attention(w, p, spec, eps)
        self.mlp = GatedMLP(w, p, "gelu_tanh")

    def __call__(self, ops, x, positions, cache):
        x = x + self.post_attn_norm(ops, self.attention(ops, self.attn_norm(ops, x), positions, cache))
        return x + self.post_ffn_norm(ops, self.mlp(ops, self.ffn_norm(ops, x)))


class Model(CausalLM):
    block = TransformerBlock

    def __init__(self, args: Gemma3Args, w: Weights):
        super().__init__(args, w)
        self.embed_scale = math.sqrt(args.hidden_size)
        self.final_softcap = args.final_softcap


ARGS = Gemma3Args
