"""Qwen 3: Llama blocks with per-head q/k RMSNorm before RoPE (NeoX rotation), explicit head_dim."""

from __future__ import annotations

from . import llama


class Model(llama.Model):
    rope_neox = True  # the q/k norms come with the weights: Attention applies them when present


ARGS = llama.ARGS
