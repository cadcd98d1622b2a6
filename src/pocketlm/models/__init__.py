"""Architectures by GGUF `general.architecture` name; each module has `ARGS` and `Model`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedError
from .base import CausalLM, Weights

# GGUF general.architecture -> module (named after the checkpoint's model_type)
ARCHITECTURES = {
    "llama": "llama",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3n": "gemma3n",
    "gemma4": "gemma4",
    "phi2": "phi",
    "falcon": "falcon",
    "stablelm": "stablelm",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


def build_model(metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> CausalLM:
    """The model for `metadata["general.architecture"]`, with `tensors` by llama.cpp name."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    module = importlib.import_module(f".{ARCHITECTURES[arch]}", __name__)
    return module.Model(module.ARGS.from_metadata(metadata), Weights(tensors))
