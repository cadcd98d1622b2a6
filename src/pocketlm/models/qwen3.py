"""Qwen 3: Llama blocks with per-head q/k RMSNorm before RoPE (NeoX rotation), explicit head_dim."""

from __future__ import annotations

from . import llama


class Model(llama.Model):
    rope_neox = True
    qk_norm = "rms"


ARGS = llama.ARGS
