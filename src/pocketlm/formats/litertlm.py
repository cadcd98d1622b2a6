"""LiteRT-LM's .litertlm files, read-only (and the protobuf helpers task.py shares).

.litertlm: "LITERTLM", u32 major / minor / patch, u64 header end at byte 24, then from byte 32 a
FlatBuffer (LiteRT-LM's litertlm_header_schema.fbs): system metadata (key / typed value) and the
sections, each a data type, items (model_type, backend_constraint, ...) and a byte range
[begin, end) of the file. Sections are TFLite models or weights, a SentencePiece model, a
tokenizer.json compressed with zlib (u64 size, then the stream) and metadata protobufs.

The FlatBuffer header is read by flatbuf.py, which checks every offset; the LlmMetadata protobuf
by the `_pb2` module Google publishes in `litert-lm-builder`; LlmParameters and the SentencePiece
model, which no small package publishes, by protobuf descriptors declared here from their .proto
field numbers. Every section and entry must lie inside the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnsupportedError
from .flatbuf import FlatBuffer, Table, map_file
from .tflite import TFLiteModel, read_tflite

MAGIC = b"LITERTLM"
SUPPORTED_MAJOR = 1
SECTION_TYPES = {
    0: "NONE",
    1: "GenericBinaryData",
    2: "Deprecated",
    3: "TFLiteModel",
    4: "SP_Tokenizer",
    5: "LlmMetadataProto",
    6: "HF_Tokenizer_Zlib",
    7: "TFLiteWeights",
    8: "EmbeddingMetadataProto",
    9: "ExecutorMetadataProto",
    10: "TtsMetadataProto",
    11: "AsrMetadataProto",
}
# VData union member -> the scalar type of its single field (a StringValue holds a string)
_VDATA = {
    1: "u8",
    2: "i8",
    3: "u16",
    4: "i16",
    5: "u32",
    6: "i32",
    7: "f32",
    8: "bool",
    9: "str",
    10: "u64",
    11: "i64",
    12: "f64",
}
# the metadata sections Google's litert-lm-builder has protobuf modules for
_METADATA_PROTOS = {
    "LlmMetadataProto": ("llm_metadata_pb2", "LlmMetadata"),
    "ExecutorMetadataProto": ("executor_metadata_pb2", "ExecutorMetadata"),
    "EmbeddingMetadataProto": ("embedding_metadata_pb2", "EmbeddingMetadata"),
}
MAX_TOKENIZER_JSON = 128 << 20  # bytes a compressed tokenizer.json may expand to (Gemma's: 33 MB)


@dataclass
class Section:
    index: int
    data_type: str
    begin: int
    end: int
    items: dict[str, Any]
    data: memoryview = field(repr=False)
    tflite: TFLiteModel | None = None
    decoded: dict[str, Any] | None = None  # a metadata protobuf, as a dict
    tokenizer: dict[str, Any] | None = None  # kind, vocabulary size


@dataclass
class LiteRTLMFile:
    path: Path
    version: tuple[int, int, int]
    header_end: int
    system_metadata: dict[str, Any]
    sections: list[Section]
    size: int


def _key_values(entries: list[Table], fb: FlatBuffer) -> dict[str, Any]:
    out = {}
    for e in entries:
        key = e.string(0, "a metadata key") or ""
        scalar_type = _VDATA.get(e.scalar(1, "u8"))
        value = e.table(2, f"the value of {key!r}")
        if scalar_type is None or value is None:
            out[key] = None
        elif scalar_type == "str":
            out[key] = value.string(0, f"the value of {key!r}")
        else:
            out[key] = value.scalar(0, scalar_type)
    return out


def open_litertlm(path: str | os.PathLike) -> LiteRTLMFile:
    path = Path(path)
    buf = map_file(path)
    if len(buf) < 32 or bytes(buf[:8]) != MAGIC:
        raise ModelFileError(f"{path}: not a .litertlm file (bad magic or too short)")
    major, minor, patch = struct.unpack_from("<III", buf, 8)
    if major != SUPPORTED_MAJOR:
        raise ModelFileError(f"{path}: .litertlm version {major}.{minor}.{patch} is not supported (1.x)")
    header_end = struct.unpack_from("<Q", buf, 24)[0]
    if not 32 < header_end <= len(buf):
        raise ModelFileError(f"{path}: header end {header_end} lies outside the file's {len(buf)} bytes")
    fb = FlatBuffer(buf[32:header_end], path, "the .litertlm header", base=32)
    root = fb.root()
    system = root.table(0, "the system metadata")
    system_metadata = _key_values(system.tables(0, "system metadata entries"), fb) if system else {}
    sections_table = root.table(1, "the section metadata")
    sections = []
    for i, s in enumerate(sections_table.tables(0, "sections") if sections_table else []):
        begin, end, section_type = s.scalar(1, "u64"), s.scalar(2, "u64"), s.scalar(3, "u8")
        if not header_end <= begin <= end <= len(buf):
            raise ModelFileError(
                f"{path}: section {i} spans bytes {begin}..{end}, outside the file's data ({header_end}..{len(buf)})"
            )
        section_name = SECTION_TYPES.get(section_type, f"unknown ({section_type})")
        sections.append(
            Section(
                i, section_name, begin, end, _key_values(s.tables(0, "section items"), fb), buf[begin:end]
            )
        )
    ordered = sorted(sections, key=lambda s: (s.begin, s.end))
    for before, after in zip(ordered, ordered[1:]):  # shared bytes would be decoded again and again
        if after.begin < before.end:
            raise ModelFileError(
                f"{path}: sections {before.index} and {after.index} overlap (byte {after.begin})"
            )
    for section in sections:
        _decode_section(section, path)
    return LiteRTLMFile(path, (major, minor, patch), header_end, system_metadata, sections, len(buf))


def _decode_section(section: Section, path: Path) -> None:
    what = f"section {section.index} ({section.data_type})"
    if section.data_type == "TFLiteModel":
        section.tflite = read_tflite(
            section.data, path, base=section.begin, what=f"the TFLite model of {what}"
        )
    elif section.data_type in _METADATA_PROTOS:
        import importlib

        module, name = _METADATA_PROTOS[section.data_type]
        try:
            message = getattr(importlib.import_module(f"litert_lm_builder.runtime.proto.{module}"), name)
        except (ImportError, AttributeError) as e:  # a broken or too new litert-lm-builder
            raise UnsupportedError(
                f"{path}: {what} needs Google's litert-lm-builder 0.18 (pip install 'litert-lm-builder>=0.18,<0.19'): {e}"
            ) from None
        section.decoded = parse_proto(message, section.data, path, what)
    elif section.data_type == "SP_Tokenizer":
        section.tokenizer = {
            "kind": "SentencePiece",
            "vocab_size": sentencepiece_size(section.data, path, what),
        }
    elif section.data_type == "HF_Tokenizer_Zlib":
        section.tokenizer = {"kind": "Hugging Face tokenizer.json", **_hf_tokenizer(section.data, path, what)}


def parse_proto(message_class, data: memoryview, path: Path, what: str) -> dict:
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import DecodeError

    message = message_class()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, RecursionError, ValueError) as e:
        raise ModelFileError(
            f"{path}: {what} is not a valid {message_class.__name__} protobuf ({e})"
        ) from None
    return MessageToDict(message, preserving_proto_field_name=True)


def hf_tokenizer_json(data: memoryview, path: Path, what: str) -> dict:
    """tokenizer.json stored as u64 size + zlib stream, decoded (at most MAX_TOKENIZER_JSON bytes)."""
    if len(data) < 8:
        raise ModelFileError(f"{path}: {what} is too short")
    size = struct.unpack_from("<Q", data, 0)[0]
    if size > MAX_TOKENIZER_JSON:
        raise ModelFileError(f"{path}: {what} claims a {size}-byte tokenizer.json")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(bytes(data[8:]), size + 1)
        spec = json.loads(text)
    except (zlib.error, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: {what} does not hold a zlib-compressed tokenizer.json ({e})") from None
    if len(text) != size:
        raise ModelFileError(f"{path}: {what} expands to {len(text)} bytes, not the {size} it states")
    if not isinstance(spec, dict):
        raise ModelFileError(f"{path}: {what}: tokenizer.json is not a JSON object")
    return spec


def _hf_tokenizer(data: memoryview, path: Path, what: str) -> dict:
    """The model type and vocabulary size of a stored tokenizer.json."""
    spec = hf_tokenizer_json(data, path, what)
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = spec.get("added_tokens")
    return {
        "model": model.get("type") if isinstance(model, dict) else None,
        "vocab_size": len(vocab) if isinstance(vocab, (dict, list)) else None,
        "added_tokens": len(added) if isinstance(added, list) else 0,
    }


# -- protobufs without a published Python module ----------------------------------------------------

_CLASSES: dict[str, Any] = {}


def message_class(name: str):
    """LlmParameters (mediapipe/tasks/cc/genai/inference/proto/llm_params.proto) and the piece list
    of SentencePiece's ModelProto, declared from their field numbers."""
    if name in _CLASSES:
        return _CLASSES[name]
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="pocketlm_litert.proto", package="pocketlm.litert", syntax="proto3"
    )

    def message(msg_name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = proto.message_type.add(name=msg_name)
        for field_name, number, field_type, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=field_type, label=label)
            if type_name:
                f.type_name = type_name

    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message(
        "PromptTemplate",
        [
            ("session_prefix", 1, F.TYPE_STRING, one, ""),
            ("prompt_prefix", 2, F.TYPE_STRING, one, ""),
            ("prompt_suffix", 3, F.TYPE_STRING, one, ""),
        ],
    )
    message(
        "LlmParameters",
        [
            ("vocab_size", 2, F.TYPE_INT32, one, ""),
            ("start_token_id", 4, F.TYPE_INT32, one, ""),
            ("stop_tokens", 5, F.TYPE_STRING, many, ""),
            ("start_token", 6, F.TYPE_STRING, one, ""),
            ("prompt_template", 8, F.TYPE_MESSAGE, one, ".pocketlm.litert.PromptTemplate"),
            ("num_draft_tokens", 9, F.TYPE_INT32, one, ""),
            ("user_role_token", 11, F.TYPE_STRING, one, ""),
            ("system_role_token", 12, F.TYPE_STRING, one, ""),
            ("model_role_token", 13, F.TYPE_STRING, one, ""),
            ("end_role_token", 14, F.TYPE_STRING, one, ""),
        ],
    )
    message("SentencePiece", [("piece", 1, F.TYPE_STRING, one, "")])
    message("SentencePieceModel", [("pieces", 1, F.TYPE_MESSAGE, many, ".pocketlm.litert.SentencePiece")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    for n in ("LlmParameters", "SentencePieceModel"):
        _CLASSES[n] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"pocketlm.litert.{n}"))
    return _CLASSES[name]


def sentencepiece_size(data: memoryview, path: Path, what: str) -> int:
    return len(parse_proto(message_class("SentencePieceModel"), data, path, what).get("pieces", []))
