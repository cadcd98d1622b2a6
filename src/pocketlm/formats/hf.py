"""Reading a Hugging Face checkpoint folder: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError


class HFCheckpoint:
    """A checkpoint folder; tensors are read one at a time (as float32) from safetensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelFileError(f"{self.folder}: not a folder (expected a Hugging Face checkpoint)")
        self.config = self._json("config.json", required=True)
        self.tokenizer_config = self._json("tokenizer_config.json") or {}
        self._files = sorted(self.folder.glob("*.safetensors"))
        if not self._files:
            raise ModelFileError(
                f"{self.folder}: no *.safetensors files (other weight formats are not supported)"
            )
        self._where: dict[str, Path] = {}
        from safetensors import safe_open

        for path in self._files:
            try:
                with safe_open(path, framework="numpy") as f:
                    self._where.update({name: path for name in f.keys()})
            except Exception as e:
                raise ModelFileError(f"{path}: cannot read safetensors ({e})") from None

    def _json(self, name: str, required: bool = False) -> Any:
        path = self.folder / name
        if not path.exists():
            if required:
                raise ModelFileError(f"{self.folder}: {name} is missing")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{path}: invalid JSON ({e})") from None

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self._where[name], framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 (bf16 is widened exactly)."""
        from safetensors import safe_open

        with safe_open(self._where[name], framework="numpy") as f:
            try:
                return np.asarray(f.get_tensor(name), dtype=np.float32)
            except TypeError:  # numpy has no bfloat16: read the raw bits
                pass
        return _read_bf16(self._where[name], name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a tensor (first axis) as float32, read from the mapped file:
        a conversion of a very large tensor never holds it whole."""
        path = self._where[name]
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(header_len))[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        shape = info["shape"]
        begin, _ = info["data_offsets"]
        raw = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=tuple(shape))[
            start:stop
        ]
        if info["dtype"] == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.tensor(name)

    @property
    def tokenizer_json(self) -> dict | None:
        return self._json("tokenizer.json")

    @property
    def sentencepiece_model(self) -> Path | None:
        path = self.folder / "tokenizer.model"
        return path if path.exists() else None

    @property
    def chat_template(self) -> str | None:
        path = self.folder / "chat_template.jinja"
        if path.exists():
            return path.read_text(encoding="utf-8")
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    @property
    def generation_config(self) -> dict:
        return self._json("generation_config.json") or {}


_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """safetensors stores a header of JSON then raw little-endian data; widen bf16 to float32."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(header_len))[name]
        start, end = info["data_offsets"]
        f.seek(8 + header_len + start)
        raw = np.frombuffer(f.read(end - start), "<u2")
    if info["dtype"] != "BF16":
        raise ModelFileError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
