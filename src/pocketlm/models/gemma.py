"""Gemma (1): Llama's blocks with GeGLU (tanh GELU), NeoX RoPE, (1 + w) RMSNorm (stored with the
1 added), embeddings scaled by sqrt(hidden), tied output, head_dim 256, multi-query attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import llama
from .base import DecoderArgs, Weights


@dataclass
class GemmaArgs(DecoderArgs):
    head_dim: int = 256
    norm_eps: float = 1e-6
    context_length: int = 8192


class Model(llama.Model):
    rope_neox = True
    activation = "gelu_tanh"

    def __init__(self, args: GemmaArgs, w: Weights):
        super().__init__(args, w)
        self.embed_scale = math.sqrt(args.hidden_size)


ARGS = GemmaArgs
