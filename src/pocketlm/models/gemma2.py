"""Gemma 2: Gemma 3's blocks without q/k norms, with attention logit soft-capping, one RoPE base,
and sliding-window layers alternating with global ones (even layers slide)."""

from __future__ import annotations

from dataclasses import dataclass

from . import gemma3


@dataclass
class Gemma2Args(gemma3.Gemma3Args):
    qk_norm = None
    rope_base: float = 10_000.0
    default_period = 2

    def __post_init__(self):
        super().__post_init__()
        self.rope_base_swa = self.rope_base  # one base for every layer


class Model(gemma3.Model):
    pass


ARGS = Gemma2Args
