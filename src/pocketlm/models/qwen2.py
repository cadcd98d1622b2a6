"""Qwen 2 / 2.5: Llama blocks with q/k/v biases and the NeoX RoPE rotation (llama.cpp does not
permute Qwen's q/k rows)."""

from __future__ import annotations

from . import llama


class Model(llama.Model):
    rope_neox = True


ARGS = llama.ARGS
