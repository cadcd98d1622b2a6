"""GGUF: an mmap reader that validates before it trusts, and an atomic writer.

Layout (little-endian): magic "GGUF", version, tensor count, metadata count, metadata
key/values, tensor infos (name, dims with the row length first, type, offset), padding to the
alignment, then tensor data. Tensors are numpy views into the mmap: nothing is copied on load.
"""

from __future__ import annotations

import glob
import math
import mmap
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError
from .quants import BLOCK_LAYOUT, GGMLType, dequantize, ggml_type, tensor_nbytes

MAGIC = b"GGUF"
_U64 = struct.Struct("<Q")
DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
# llama.cpp's split models (gguf-split): NAME-00001-of-0000N.gguf, each part a GGUF file with the
# split.* keys; the first part holds the model's metadata, every part some of the tensors
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def arch_key(arch: str, key: str) -> str:
    """The metadata key for an architecture parameter: llama.cpp's `{arch}.key`, or our own
    `pocketlm.*` keys (for what llama.cpp has no name for) as they are."""
    return key if key.startswith("pocketlm.") else f"{arch}.{key}"


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's, equal to SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_DTYPES = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class Tensor:
    """One tensor of a GGUF file; `data` is a uint8 view into the mmap, `shape` in numpy order."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.type, self.shape)

    def part(self, j: int) -> Tensor:
        """Slice `j` along the first axis (a matrix of a stacked [n, rows, cols] tensor), still
        a view into the file."""
        size = self.nbytes // self.shape[0]
        return Tensor(f"{self.name}[{j}]", self.type, self.shape[1:], self.data[j * size : (j + 1) * size])

    def regrouped(self, n_rows: int) -> Tensor:
        """The same bytes read as a matrix of `n_rows` rows (each whole blocks), under the same name:
        Gemma's per-layer table [vocab, layers * width] as [vocab * layers, width]."""
        cols = self.n_elements // n_rows
        if n_rows * cols != self.n_elements or cols % BLOCK_LAYOUT[self.type][0]:
            raise ModelFileError(
                f"tensor {self.name!r} ({self.type.name} {list(self.shape)}) cannot be read as {n_rows} rows "
                f"of whole {BLOCK_LAYOUT[self.type][0]}-value blocks"
            )
        return Tensor(self.name, self.type, (n_rows, cols), self.data)

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows start..stop of a matrix (or elements of a vector), still a view into the file."""
        size = self.nbytes // self.shape[0]
        return Tensor(
            f"{self.name}[{start}:{stop}]",
            self.type,
            (stop - start, *self.shape[1:]),
            self.data[start * size : stop * size],
        )


class _Cursor:
    """Bounds-checked little-endian reads over a buffer; errors name the file and offset."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {what} at byte {self.pos}; the file is corrupt or truncated")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} bytes but the file ends")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, vtype: ValueType) -> Any:
        dtype = _SCALAR_DTYPES[vtype]
        value = np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()
        return bool(value) if vtype == ValueType.BOOL else value

    def u32(self) -> int:
        return self.scalar(ValueType.UINT32)

    def u64(self) -> int:
        return self.scalar(ValueType.UINT64)

    def string(self) -> str:
        raw = self.take(self.u64())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def value(self, vtype: int) -> Any:
        if vtype == ValueType.STRING:
            return self.string()
        if vtype == ValueType.ARRAY:
            return self.array()
        if vtype not in _SCALAR_DTYPES:
            raise self.fail(f"unknown metadata value type {vtype}")
        return self.scalar(ValueType(vtype))

    def array(self) -> Any:
        item_type, count = self.u32(), self.u64()
        self.last_item_type = ValueType(item_type) if item_type in ValueType._value2member_map_ else None
        if count > len(self.buf):
            raise self.fail(f"an array claims {count} items")
        if item_type in _SCALAR_DTYPES:
            dtype = _SCALAR_DTYPES[ValueType(item_type)]
            values = np.frombuffer(self.take(count * dtype.itemsize), dtype)
            return values.astype(bool) if item_type == ValueType.BOOL else values
        if item_type == ValueType.STRING:
            return self.strings(count)
        return [self.value(item_type) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings: a vocabulary has a quarter of a million of them, so
        this loop does the least it can per string (the same bounds checks as `take`)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = _U64.unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise ValueError
                (n,) = unpack(buf, pos)
                if n > end - pos - 8:
                    raise ValueError
                out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except (ValueError, UnicodeDecodeError):
            self.pos = pos
            raise self.fail("a string array runs past the end of the file or is not UTF-8") from None
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file opened read-only through mmap: `metadata` dict and `tensors` by name.

    The first part of a split model (NAME-00001-of-0000N.gguf) opens the whole model: the other
    parts are found beside it, validated and mapped too, their tensors joined into `tensors`;
    `parts` lists every part (just this file when the model is not split)."""

    def __init__(self, path: str | os.PathLike, _part: bool = False):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelFileError(f"{self.path}: no such model file") from None
        except (IsADirectoryError, ValueError, OSError) as e:
            raise ModelFileError(f"{self.path}: cannot open as a model file ({e})") from None
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[ValueType, ValueType | None]] = {}  # for faithful copies
        self.tensors: dict[str, Tensor] = {}
        self._parse()
        self.parts = [self]
        if not _part:
            self._join_split_parts()

    def _parse(self) -> None:
        buf = memoryview(self._mmap)
        cur = _Cursor(buf, self.path)
        if len(buf) < 24 or bytes(buf[:4]) != MAGIC:
            head = bytes(buf[:64])
            if head[:8] == b"LITERTLM" or head[4:8] == b"TFL3":
                raise ModelFileError(
                    f"{self.path}: one of Google's .litertlm / .tflite files, not GGUF: convert it with "
                    "`pocketlm convert FILE OUT.gguf` (`pocketlm run FILE` and LlmInference(FILE) do that once for you)"
                )
            if b"PK\x03\x04" in head:
                raise ModelFileError(
                    f"{self.path}: a ZIP archive (a .task bundle, a PyTorch checkpoint?), not GGUF"
                )
            raise ModelFileError(f"{self.path}: not a GGUF file (bad magic or too short)")
        cur.pos = 4
        self.version = cur.u32()
        if self.version not in (2, 3):
            raise ModelFileError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        if n_tensors > len(buf) // 16 or n_kv > len(buf) // 16:
            raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries")
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.u32()
            self.metadata[key] = cur.value(vtype)
            item_type = cur.last_item_type if vtype == ValueType.ARRAY else None
            self.value_types[key] = (ValueType(vtype), item_type)
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, (int, np.integer))
            or not 0 < alignment <= 1 << 30
            or alignment & (alignment - 1)
        ):
            raise ModelFileError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        alignment = int(alignment)
        self.data_start = data_start = -(-cur.pos // alignment) * alignment  # the header's end, aligned
        self._map_tensors(infos, buf, data_start, alignment)

    def _tensor_info(self, cur: _Cursor) -> tuple[str, GGMLType, tuple[int, ...], int]:
        name, n_dims = cur.string(), cur.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.u64() for _ in range(n_dims)]
        if any(d <= 0 or d > 1 << 40 for d in dims):
            raise cur.fail(f"tensor {name!r} has dimensions {dims}")
        type_id = cur.u32()
        try:
            tensor_type = ggml_type(type_id)
        except Exception as e:
            raise ModelFileError(f"{self.path}: tensor {name!r}: {e}") from None
        return name, tensor_type, tuple(reversed(dims)), cur.u64()

    def _map_tensors(self, infos, buf, data_start: int, alignment: int) -> None:
        data_size = len(buf) - data_start
        for name, tensor_type, shape, offset in infos:
            try:
                nbytes = tensor_nbytes(tensor_type, math.prod(shape))  # Python ints: no 64-bit wrap-around
            except Exception as e:
                raise ModelFileError(f"{self.path}: tensor {name!r}: {e}") from None
            if shape[-1] % BLOCK_LAYOUT[tensor_type][0]:
                raise ModelFileError(f"{self.path}: tensor {name!r} rows do not fill whole blocks")
            if offset % alignment or offset + nbytes > data_size:
                raise ModelFileError(
                    f"{self.path}: tensor {name!r} at data offset {offset} ({nbytes} bytes) lies "
                    f"outside the file's {data_size} data bytes; the file is truncated or corrupt"
                )
            if name in self.tensors:
                raise ModelFileError(f"{self.path}: tensor {name!r} appears twice")
            start = data_start + offset
            data = np.frombuffer(buf, np.uint8, nbytes, start)
            self.tensors[name] = Tensor(name, tensor_type, shape, data)

    def _join_split_parts(self) -> None:
        count = self.metadata.get("split.count")
        if count is None:
            return
        no = self.metadata.get("split.no")
        if (
            isinstance(count, bool)
            or not isinstance(count, int)
            or not isinstance(no, int)
            or not 0 <= no < count
        ):
            raise ModelFileError(
                f"{self.path}: split.no {no!r} / split.count {count!r} are not a valid part number"
            )
        if count == 1:
            return
        named = SPLIT_NAME.match(self.path.name)
        if no != 0:
            first = f"{named['stem']}-00001-of-{count:05d}.gguf" if named else "the part with split.no 0"
            raise ModelFileError(
                f"{self.path}: part {no + 1} of {count} of a split model; open its first part, {first}"
            )
        if not named or int(named["count"]) != count:
            raise ModelFileError(
                f"{self.path}: the first of {count} parts of a split model must be named "
                f"NAME-00001-of-{count:05d}.gguf (so that the other parts can be found)"
            )
        for i in range(1, count):
            part_path = self.path.with_name(f"{named['stem']}-{i + 1:05d}-of-{count:05d}.gguf")
            if not part_path.exists():
                raise ModelFileError(
                    f"{self.path}: part {i + 1} of {count} of this split model is missing: {part_path}"
                )
            part = GGUFFile(part_path, _part=True)
            if part.metadata.get("split.no") != i or part.metadata.get("split.count") != count:
                raise ModelFileError(
                    f"{part_path}: its split.no / split.count do not say part {i + 1} of {count}"
                )
            for name, tensor in part.tensors.items():
                if name in self.tensors:
                    raise ModelFileError(f"{part_path}: tensor {name!r} is also in an earlier part")
                self.tensors[name] = tensor
            self.parts.append(part)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise ModelFileError(
                f"{self.path}: the parts hold {len(self.tensors)} tensors, split.tensors.count says {expected}"
            )

    @property
    def size(self) -> int:
        """Bytes on disk, all parts together."""
        return sum(part.path.stat().st_size for part in self.parts)

    def release_pages(self, tensor: Tensor | None = None, begin: int = 0, end: int | None = None) -> None:
        """Let the kernel drop this file's pages (one tensor's, bytes begin..end of it, or all)
        from our resident memory, once the weights were copied elsewhere. The mapping is
        read-only, so whatever is read again is simply paged back in from the file."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        if tensor is None:
            for part in self.parts:
                part._mmap.madvise(mmap.MADV_DONTNEED)
            return
        address = tensor.data.ctypes.data
        for part in self.parts:  # the part whose mapping holds the tensor
            base = np.frombuffer(part._mmap, np.uint8, 1).ctypes.data
            if base <= address < base + len(part._mmap):
                break
        else:
            raise ValueError(f"tensor {tensor.name!r} is not in {self.path}")
        start = address - base + begin
        stop = start - begin + (tensor.nbytes if end is None else min(end, tensor.nbytes))
        first = start - start % mmap.PAGESIZE
        part._mmap.madvise(mmap.MADV_DONTNEED, first, stop - first)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: metadata has no general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


# ---- writing ----------------------------------------------------------------------------------


def _remove_stale_partials(path: Path) -> None:
    """Remove `.{name}.{pid}.*.partial` files beside `path` left by writers no longer running."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            leftover.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _value_type(value: Any) -> ValueType:
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        if -(1 << 31) <= value < 1 << 32:
            return ValueType.INT32 if value < 0 else ValueType.UINT32
        return ValueType.INT64 if value < 0 else ValueType.UINT64
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return ValueType.ARRAY
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _pack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(value: Any, vtype: ValueType, item_type: ValueType | None = None) -> bytes:
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype != ValueType.ARRAY:
        return np.asarray(value, _SCALAR_DTYPES[vtype]).tobytes()
    if item_type is None:
        if isinstance(value, np.ndarray):
            item_type = next(t for t, d in _SCALAR_DTYPES.items() if d == value.dtype.newbyteorder("<"))
        else:
            item_type = _value_type(value[0]) if len(value) else ValueType.UINT32
    head = struct.pack("<IQ", item_type, len(value))
    if item_type == ValueType.STRING:
        return head + b"".join(_pack_string(s) for s in value)
    return head + np.asarray(value, _SCALAR_DTYPES[item_type]).tobytes()


@dataclass
class _PendingTensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]
    produce: Callable[[], Any]  # the packed bytes (uint8) when written, whole or as an iterable of parts
    nbytes: int


class GGUFWriter:
    """Collects metadata and tensor producers, then writes the file atomically.

    Tensor data is produced one tensor at a time during `write`, so a conversion never holds
    more than one quantized tensor in memory. The file appears under its name only when
    complete; an error or Ctrl-C removes the temporary file.
    """

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT):
        self.alignment = alignment
        self.metadata: dict[str, tuple[Any, ValueType, ValueType | None]] = {}
        self.tensors: list[_PendingTensor] = []

    def add(
        self, key: str, value: Any, vtype: ValueType | None = None, item_type: ValueType | None = None
    ) -> None:
        self.metadata[key] = (value, vtype or _value_type(value), item_type)

    def add_tensor(
        self, name: str, tensor_type: GGMLType, shape: tuple[int, ...], produce: Callable[[], np.ndarray]
    ) -> None:
        nbytes = tensor_nbytes(tensor_type, int(np.prod(shape)))
        self.tensors.append(_PendingTensor(name, tensor_type, tuple(shape), produce, nbytes))

    def _header(self) -> bytes:
        parts = [MAGIC, struct.pack("<IQQ", 3, len(self.tensors), len(self.metadata))]
        if self.alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", self.alignment)
        for key, (value, vtype, item_type) in self.metadata.items():
            parts += [_pack_string(key), struct.pack("<I", vtype), _pack_value(value, vtype, item_type)]
        offset = 0
        for t in self.tensors:
            dims = list(reversed(t.shape))
            parts += [
                _pack_string(t.name),
                struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.type, offset),
            ]
            offset += -(-t.nbytes // self.alignment) * self.alignment
        return b"".join(parts)

    def write(
        self, path: str | os.PathLike, on_tensor: Callable[[_PendingTensor], None] | None = None
    ) -> None:
        """Write the file at `path` whole or not at all: into a hidden `.partial` beside it, renamed
        when complete, removed on any error or interrupt. A writer killed outright (SIGKILL, power)
        cannot remove its own; the next write of the same path removes those of dead processes."""
        path = Path(path)
        _remove_stale_partials(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                header = self._header()
                f.write(header + bytes(-len(header) % self.alignment))
                for t in self.tensors:
                    produced = t.produce()
                    written = 0
                    for part in [produced] if isinstance(produced, np.ndarray) else produced:
                        part = np.ascontiguousarray(part, dtype=np.uint8)
                        f.write(part.tobytes())
                        written += part.nbytes
                    if written != t.nbytes:
                        raise ValueError(f"tensor {t.name}: produced {written} bytes, expected {t.nbytes}")
                    f.write(bytes(-t.nbytes % self.alignment))
                    if on_tensor:
                        on_tensor(t)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
