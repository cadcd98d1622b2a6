"""Which tensor type each tensor gets: a base `--quant` plus per-component bits, as in
MediaPipe's converter (attention / feed-forward / embedding at 4 or 8 bits)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidOptionError
from ..formats.quants import BLOCK_LAYOUT, GGMLType

QUANT_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")

# llama.cpp's general.file_type (llama_ftype) for each base choice
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}

_COMPONENTS = {
    "attention": re.compile(r"\.attn_(q|k|v|qkv|output)\.weight$"),
    "ffn": re.compile(r"\.ffn_(gate|up|down|gate_up)\.weight$"),
    "embedding": re.compile(r"^(token_embd|output)\.weight$"),
}


@dataclass(frozen=True)
class ConversionConfig:
    quant: str = "f16"
    attention_bits: int | None = None
    ffn_bits: int | None = None
    embedding_bits: int | None = None
    matformer: str | None = None  # Gemma 3n: a preset or JSON slice (see convert.gemma3n.MatFormerSlice)
    # Google's files: keep INT8 per-channel / INT4 block-32 weights in their own bits (Q8_0 / Q4_0)
    # instead of re-quantizing them to `quant`
    keep_source_bits: bool = True

    def __post_init__(self):
        if self.quant not in QUANT_CHOICES:
            raise InvalidOptionError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        for option in ("attention_bits", "ffn_bits", "embedding_bits"):
            bits = getattr(self, option)
            if bits not in (None, 4, 8):
                raise InvalidOptionError(f"--{option.replace('_', '-')} must be 4 or 8, got {bits!r}")

    def _bits_type(self, bits: int) -> GGMLType:
        if bits == 8:
            return GGMLType.Q8_0
        return GGMLType.Q4_1 if self.quant == "q4_1" else GGMLType.Q4_0

    def tensor_type(self, name: str, shape: tuple[int, ...]) -> GGMLType:
        """The type for tensor `name` of numpy `shape`; vectors and norms (even per-head ones,
        stored as matrices) stay float32, and matrices whose rows do not fill whole blocks fall
        back to float16 (as llama.cpp does)."""
        if len(shape) < 2 or name.endswith("norm.weight") or self.quant == "f32":
            return GGMLType.F32
        tensor_type = GGMLType[self.quant.upper()]
        for component, pattern in _COMPONENTS.items():
            bits = getattr(self, f"{component}_bits")
            if bits and pattern.search(name):
                tensor_type = self._bits_type(bits)
        if shape[-1] % BLOCK_LAYOUT[tensor_type][0]:
            return GGMLType.F16
        return tensor_type

    @property
    def file_type(self) -> int:
        return FILE_TYPES[self.quant]
