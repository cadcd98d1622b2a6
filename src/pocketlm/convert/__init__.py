"""Checkpoint -> GGUF: a Hugging Face folder, another GGUF file or one of Google's .litertlm /
.task / .tflite LLM files (litert.py), (re)quantized by a policy.

    convert("path/to/hf-checkpoint", "model.gguf", ConversionConfig(quant="q8_0", ffn_bits=4))

Tensors are read, transformed and quantized one at a time while the file is written; the
output appears only when complete (see `GGUFWriter.write`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import InvalidOptionError, ModelFileError
from ..formats.gguf import GGUFFile, GGUFWriter, arch_key
from ..formats.hf import HFCheckpoint
from ..formats.quants import GGMLType, quantize
from .architectures import mapping_for
from .litert import is_google_file, litert_writer
from .policy import ConversionConfig
from .tokenizer import tokenizer_metadata

__all__ = ["ConversionConfig", "convert"]


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: ConversionConfig | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `out` from `src` (a checkpoint folder, a .gguf file or a Google LLM file); returns the output path.
    `metadata` adds (or replaces) keys, such as where the model came from."""
    config = config or ConversionConfig()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ModelFileError(f"{src}: no such file or folder")
    if out.resolve() == src.resolve():
        raise ModelFileError(f"{out}: the output would overwrite the input; choose another name")
    if not out.parent.is_dir():
        raise ModelFileError(f"{out.parent}: output folder does not exist")
    if out.is_dir():
        raise ModelFileError(f"{out}: is a folder; give the output file's name (e.g. {out / 'model.gguf'})")
    if src.is_file() and is_google_file(src):
        writer = litert_writer(src, config, keep_bits=config.keep_source_bits, verbose=progress)
    elif src.is_file():
        writer = _from_gguf(GGUFFile(src), config)
    else:
        writer = _from_checkpoint(HFCheckpoint(src), config)
    for key, value in (metadata or {}).items():
        writer.add(key, value)
    total = sum(t.nbytes for t in writer.tensors)
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"writing {out.name}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        writer.write(out, on_tensor=lambda t: bar.update(t.nbytes))
    return out


CHUNK_VALUES = 1 << 26  # tensors larger than this (256 MB as float32) are read and quantized by rows


def _quantized(load, tensor_type: GGMLType, shape: tuple[int, ...] = ()):
    """The tensor's bytes in `tensor_type`; a loader with `rows(start, stop)` and a large tensor are
    converted a band of rows at a time (Gemma 3n's per-layer table is billions of values)."""
    size = int(np.prod(shape)) if shape else 0
    if size <= CHUNK_VALUES or not hasattr(load, "rows"):
        return lambda: quantize(load(), tensor_type)
    band = max(1, CHUNK_VALUES // int(np.prod(shape[1:])))
    return lambda: (
        quantize(load.rows(start, min(start + band, shape[0])), tensor_type)
        for start in range(0, shape[0], band)
    )


def _from_checkpoint(ckpt: HFCheckpoint, config: ConversionConfig) -> GGUFWriter:
    mapping = mapping_for(ckpt.config, config.matformer)
    writer = GGUFWriter()
    writer.add("general.architecture", mapping.arch)
    writer.add("general.name", ckpt.config.get("_name_or_path") or ckpt.folder.name)
    writer.add("general.file_type", config.file_type)
    writer.add("general.quantization_version", 2)
    for key, value in mapping.metadata().items():
        writer.add(arch_key(mapping.arch, key), value)
    vocab_size = None
    text_config = ckpt.config.get("text_config") or {}
    tied = bool(ckpt.config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))
    for gguf_name, shape, load in mapping.tensors(ckpt):
        if gguf_name == "output.weight" and tied:
            continue
        if gguf_name == "token_embd.weight":
            vocab_size = shape[0]
        tensor_type = config.tensor_type(gguf_name, shape)
        writer.add_tensor(gguf_name, tensor_type, shape, _quantized(load, tensor_type, shape))
    if vocab_size is None:
        raise ModelFileError(f"{ckpt.folder}: checkpoint has no token embedding")
    for key, (value, vtype, item_type) in tokenizer_metadata(ckpt, vocab_size).items():
        writer.add(key, value, vtype, item_type)
    skipped = [n for n in ckpt.names if any(part in n for part in mapping.skip_parts)]
    if skipped:
        print(
            f"pocketlm: converting the text model only; skipped {len(skipped)} vision/audio tensors",
            file=sys.stderr,
        )
    writer.tensors.sort(key=_tensor_order)
    return writer


def _tensor_order(t) -> tuple:
    """token_embd, then blocks in layer order, then the output tensors (llama.cpp's order)."""
    parts = t.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), t.name)
    return (0 if parts[0] == "token_embd" else 2, 0, t.name)


def _from_gguf(src: GGUFFile, config: ConversionConfig) -> GGUFWriter:
    if config.matformer:
        raise InvalidOptionError("--matformer slices a Hugging Face checkpoint, not a GGUF file")
    writer = GGUFWriter(alignment=int(src.get("general.alignment", 32)))
    for key, value in src.metadata.items():
        if key != "general.alignment" and not key.startswith("split."):  # a split model becomes one file
            writer.add(key, value, *src.value_types[key])
    writer.add("general.file_type", config.file_type)
    for t in src.tensors.values():
        tensor_type = config.tensor_type(t.name, t.shape)
        if tensor_type == t.type:
            writer.add_tensor(t.name, tensor_type, t.shape, lambda t=t: np.asarray(t.data))
        else:
            writer.add_tensor(t.name, tensor_type, t.shape, _quantized(t.dequantize, tensor_type))
    return writer
