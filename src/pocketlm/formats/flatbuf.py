"""A FlatBuffer reader that checks every offset before it follows it.

TFLite models and the .litertlm header are FlatBuffers. The generated Python bindings (Google's
`*_py_generated.py`, the `flatbuffers` runtime) trust the bytes: a crafted file makes them read
out of range, loop, or fail with struct errors deep inside. Here every table, vtable, vector and
string is bounds-checked against its buffer first, and any violation is a one-line
ModelFileError naming the file, the byte and what was being read. Field numbers come from the
formats' published schemas (tflite's schema.fbs, LiteRT-LM's litertlm_header_schema.fbs).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError

_U8, _U16, _I32, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<i", "<I", "<Q"))
_SCALARS = {
    "u8": _U8,
    "i8": struct.Struct("<b"),
    "bool": _U8,
    "u16": _U16,
    "i16": struct.Struct("<h"),
    "u32": _U32,
    "i32": _I32,
    "u64": _U64,
    "i64": struct.Struct("<q"),
    "f32": struct.Struct("<f"),
    "f64": struct.Struct("<d"),
}


class FlatBuffer:
    """A buffer (a view of a mapped file) holding one FlatBuffer; `base` is where the view
    starts in the file, for error messages."""

    def __init__(self, buf: memoryview | bytes, path: Path, what: str, base: int = 0):
        self.buf, self.path, self.what, self.base = memoryview(buf), path, what, base
        # a table takes at least 4 bytes, so a reader that visits each table once sees at most
        # len/4 of them; more means entries pointing at the same tables over and over (a crafted
        # file that would otherwise make a few kB cost hours)
        self.budget = len(self.buf) // 4 + 16

    def fail(self, at: int, problem: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {self.what} at byte {self.base + at}: {problem}")

    def read(self, fmt: struct.Struct, at: int, what: str) -> int:
        if at < 0 or at + fmt.size > len(self.buf):
            raise self.fail(at, f"{what} lies outside the {len(self.buf)} bytes")
        return fmt.unpack_from(self.buf, at)[0]

    def root(self, identifier: bytes | None = None) -> Table:
        if identifier is not None and bytes(self.buf[4:8]) != identifier:
            raise self.fail(
                4, f"not a {identifier.decode()} FlatBuffer (identifier {bytes(self.buf[4:8])!r})"
            )
        return self.table_at(self.read(_U32, 0, "the root offset"), "the root table")

    def table_at(self, at: int, what: str) -> Table:
        self.budget -= 1
        if self.budget < 0:
            raise self.fail(
                at, f"more tables than {len(self.buf)} bytes can hold (entries reused over and over)"
            )
        vtable = at - self.read(_I32, at, what)
        size = self.read(_U16, vtable, f"{what}'s vtable")
        if size < 4 or size % 2 or vtable + size > len(self.buf):
            raise self.fail(vtable, f"{what} has a vtable of {size} bytes")
        object_size = self.read(_U16, vtable + 2, f"{what}'s size")
        if object_size < 4 or at + object_size > len(self.buf):
            raise self.fail(at, f"{what} claims {object_size} bytes")
        return Table(self, at, vtable, size, object_size, what)


class Table:
    def __init__(self, fb: FlatBuffer, at: int, vtable: int, vtable_size: int, object_size: int, what: str):
        self.fb, self.at, self.vtable, self.vtable_size, self.object_size, self.what = (
            fb,
            at,
            vtable,
            vtable_size,
            object_size,
            what,
        )

    def _field(self, i: int, width: int) -> int | None:
        """The absolute position of field i, or None when absent."""
        slot = 4 + 2 * i
        if slot + 2 > self.vtable_size:
            return None
        offset = self.fb.read(_U16, self.vtable + slot, f"{self.what} field {i}")
        if offset == 0:
            return None
        if offset + width > self.object_size:
            raise self.fb.fail(
                self.at, f"{self.what} field {i} runs past the table's {self.object_size} bytes"
            )
        return self.at + offset

    def scalar(self, i: int, scalar_type: str, default=0):
        fmt = _SCALARS[scalar_type]
        at = self._field(i, fmt.size)
        value = default if at is None else self.fb.read(fmt, at, f"{self.what} field {i}")
        return bool(value) if scalar_type == "bool" else value

    def _target(self, i: int) -> int | None:
        at = self._field(i, 4)
        return None if at is None else at + self.fb.read(_U32, at, f"{self.what} field {i}")

    def table(self, i: int, what: str) -> Table | None:
        at = self._target(i)
        return None if at is None else self.fb.table_at(at, what)

    def _vector(self, i: int, item: int, what: str) -> tuple[int, int] | None:
        at = self._target(i)
        if at is None:
            return None
        count = self.fb.read(_U32, at, f"the length of {what}")
        if at + 4 + count * item > len(self.fb.buf):
            raise self.fb.fail(at, f"{what} of {count} items runs past the end")
        return at + 4, count

    def string(self, i: int, what: str) -> str | None:
        found = self._vector(i, 1, what)
        if found is None:
            return None
        start, count = found
        try:
            return bytes(self.fb.buf[start : start + count]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fb.fail(start, f"{what} is not UTF-8") from None

    def array(self, i: int, dtype: str, what: str) -> np.ndarray:
        """A vector of scalars as a numpy view (empty when absent)."""
        dt = np.dtype(dtype).newbyteorder("<")
        found = self._vector(i, dt.itemsize, what)
        if found is None:
            return np.zeros(0, dt)
        start, count = found
        return np.frombuffer(self.fb.buf, dt, count, start)

    def bytes(self, i: int, what: str) -> memoryview:
        found = self._vector(i, 1, what)
        if found is None:
            return memoryview(b"")
        start, count = found
        return self.fb.buf[start : start + count]

    def length(self, i: int, what: str, item: int = 4) -> int:
        """The number of items of a vector field (0 when absent), without reading them."""
        found = self._vector(i, item, what)
        return 0 if found is None else found[1]

    def tables(self, i: int, what: str) -> list[Table]:
        found = self._vector(i, 4, what)
        if found is None:
            return []
        start, count = found
        out = []
        for j in range(count):
            at = start + 4 * j
            out.append(self.fb.table_at(at + self.fb.read(_U32, at, what), f"{what}[{j}]"))
        return out


def map_file(path: str | os.PathLike) -> memoryview:
    """A model file mapped read-only (one-line errors for a missing or unreadable one)."""
    try:
        with open(path, "rb") as f:
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except (IsADirectoryError, ValueError, OSError) as e:
        raise ModelFileError(f"{path}: cannot open as a model file ({e})") from None
