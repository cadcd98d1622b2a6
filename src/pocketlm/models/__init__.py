"""Architectures by GGUF `general.architecture` name; each module has `ARGS` and `Model`."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from ..errors import UnsupportedError
from .base import CausalLM, Weights

ARCHITECTURES = ("llama", "gemma3")


def build_model(metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> CausalLM:
    """The model for `metadata["general.architecture"]`, with `tensors` by llama.cpp name."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    module = importlib.import_module(f".{arch}", __name__)
    return module.Model(module.ARGS.from_metadata(metadata), Weights(tensors))
