"""MediaPipe's .task bundles, read-only.

A ZIP whose entries are stored uncompressed (so they can be mapped): TF_LITE_PREFILL_DECODE and
other TF_LITE_* models (Gemma 3n's add TF_LITE_EMBEDDER, TF_LITE_PER_LAYER_EMBEDDER, ...),
TOKENIZER_MODEL (SentencePiece) and METADATA (odml.infra.proto's LlmParameters). Every entry must
be stored and lie inside the file.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .flatbuf import map_file
from .litertlm import message_class, parse_proto, sentencepiece_size
from .tflite import TFLiteModel, read_tflite


@dataclass
class TaskEntry:
    name: str
    begin: int
    size: int
    data: memoryview = field(repr=False)
    tflite: TFLiteModel | None = None
    decoded: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None


@dataclass
class TaskFile:
    path: Path
    entries: list[TaskEntry]
    size: int


def open_task(path: str | os.PathLike) -> TaskFile:
    path = Path(path)
    buf = map_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelFileError(f"{path}: not a .task bundle (a ZIP file): {e}") from None
    entries, end = [], 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFileError(f"{path}: entry {info.filename} is compressed; .task entries are stored")
        at = info.header_offset
        if at < end:  # entries that share bytes: each would be read again (a crafted archive)
            raise ModelFileError(f"{path}: entry {info.filename} overlaps the entry before it (byte {at})")
        if at < 0 or at + 30 > len(buf) or bytes(buf[at : at + 4]) != b"PK\x03\x04":
            raise ModelFileError(f"{path}: entry {info.filename}'s local header at byte {at} is missing")
        name_len, extra_len = struct.unpack_from("<HH", buf, at + 26)
        begin = at + 30 + name_len + extra_len
        if begin + info.file_size > len(buf):
            raise ModelFileError(
                f"{path}: entry {info.filename} ({info.file_size} bytes at {begin}) runs past the end"
            )
        end = begin + info.file_size
        entry = TaskEntry(info.filename, begin, info.file_size, buf[begin:end])
        what = f"entry {info.filename}"
        if info.filename.startswith("TF_LITE_"):
            entry.tflite = read_tflite(entry.data, path, base=begin, what=f"the TFLite model of {what}")
        elif info.filename == "METADATA":
            entry.decoded = parse_proto(message_class("LlmParameters"), entry.data, path, what)
        elif info.filename == "TOKENIZER_MODEL":
            entry.tokenizer = {
                "kind": "SentencePiece",
                "vocab_size": sentencepiece_size(entry.data, path, what),
            }
        entries.append(entry)
    return TaskFile(path, entries, len(buf))
