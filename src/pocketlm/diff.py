"""`pocketlm diff A B`: what differs between two model files, in any mix of GGUF, .litertlm, .task
and .tflite.

Metadata that differs or is present in one file only (flattened to dotted keys: GGUF keys, the
.litertlm system metadata and decoded metadata sections, the .task parameters), sections or entries
present in one only, and the weights: matched by name, else (names differ between formats) by
position among the tensors of the same shape, which the report says; for each pair the changes of
type, shape and quantization, and, after dequantization, max |Δ|, the relative RMS difference and
the cosine similarity. Byte-identical tensors are only counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .inspection import file_format

_GGUF_FLOATS = {"F32": "FLOAT32", "F16": "FLOAT16", "BF16": "BFLOAT16"}  # GGUF's names -> TFLite's


@dataclass
class _Tensor:
    name: str
    type: str
    shape: tuple[int, ...]
    quantization: str
    raw: np.ndarray  # the stored bytes
    values: Callable[[], np.ndarray]  # dequantized, float32


@dataclass
class _Model:
    format: str
    metadata: dict[str, Any]
    parts: list[str]
    tensors: list[_Tensor]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value.tolist() if hasattr(value, "tolist") else value


def _tflite_tensors(model, prefix: str = "") -> list[_Tensor]:
    return [
        _Tensor(
            prefix + t.name,
            t.type,
            t.shape,
            t.quantization.describe(),
            t.data,
            lambda t=t: model.dequantize(t),
        )
        for t in model.weights()
    ]


def _load(path: str | os.PathLike) -> _Model:
    fmt = file_format(path)
    metadata: dict[str, Any] = {}
    if fmt == "gguf":
        from .formats.gguf import GGUFFile
        from .formats.quants import BLOCK_LAYOUT

        f = GGUFFile(path)
        _flatten("", f.metadata, metadata)
        tensors = [
            _Tensor(
                t.name,
                _GGUF_FLOATS.get(t.type.name, t.type.name),
                t.shape,
                "none"
                if t.type.name in _GGUF_FLOATS
                else f"{t.type.name} blocks of {BLOCK_LAYOUT[t.type][0]}",
                t.data,
                lambda t=t: t.dequantize().astype(np.float32),
            )
            for t in f.tensors.values()
        ]
        return _Model(fmt, metadata, [], tensors)
    if fmt == "tflite":
        from .formats.tflite import open_tflite

        return _Model(fmt, metadata, ["TFLite model"], _tflite_tensors(open_tflite(path)))
    if fmt == "litertlm":
        from .formats.litertlm import open_litertlm

        f = open_litertlm(path)
        _flatten("system", f.system_metadata, metadata)
        parts, tensors = [], []
        models = [s for s in f.sections if s.tflite]
        for s in f.sections:
            label = s.data_type + (f" ({s.items['model_type']})" if "model_type" in s.items else "")
            parts.append(label)
            if s.decoded is not None:
                _flatten(s.data_type, s.decoded, metadata)
            if s.tokenizer:
                _flatten(f"{s.data_type}.tokenizer", s.tokenizer, metadata)
            if s.tflite:
                prefix = f"{s.items.get('model_type', s.index)}:" if len(models) > 1 else ""
                tensors += _tflite_tensors(s.tflite, prefix)
        return _Model(fmt, metadata, parts, tensors)
    from .formats.task import open_task

    t = open_task(path)
    parts, tensors = [], []
    models = [e for e in t.entries if e.tflite]
    for e in t.entries:
        parts.append(e.name)
        if e.decoded is not None:
            _flatten(e.name, e.decoded, metadata)
        if e.tokenizer:
            _flatten(f"{e.name}.tokenizer", e.tokenizer, metadata)
        if e.tflite:
            tensors += _tflite_tensors(e.tflite, f"{e.name}:" if len(models) > 1 else "")
    return _Model("task", metadata, parts, tensors)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, (list, np.ndarray)) else list(a) == list(b)
    except (TypeError, ValueError):
        return False


def _pairs(
    a: list[_Tensor], b: list[_Tensor]
) -> tuple[list[tuple[_Tensor, _Tensor, str]], list[_Tensor], list[_Tensor]]:
    """Pairs by name, then the rest by position among tensors of the same shape."""
    by_name = {t.name: t for t in b}
    pairs, rest_a, used = [], [], set()
    for t in a:
        if t.name in by_name and t.name not in used:
            pairs.append((t, by_name[t.name], "name"))
            used.add(t.name)
        else:
            rest_a.append(t)
    rest_b = [t for t in b if t.name not in used]
    unmatched_a, taken = [], set()
    for t in rest_a:
        j = next((j for j, u in enumerate(rest_b) if j not in taken and u.shape == t.shape), None)
        if j is None:
            unmatched_a.append(t)
        else:
            taken.add(j)
            pairs.append((t, rest_b[j], "shape"))
    return pairs, unmatched_a, [u for j, u in enumerate(rest_b) if j not in taken]


def _numbers(x: np.ndarray, y: np.ndarray, chunk: int = 1 << 20) -> dict[str, float]:
    """max |x - y|, ||x - y|| / ||x|| and the cosine, summed in float64 a chunk at a time (a whole
    embedding table in float64 with its temporaries would take gigabytes)."""
    x, y = x.ravel(), y.ravel()
    max_abs = delta2 = x2 = y2 = dot = 0.0
    for i in range(0, x.size, chunk):
        a, b = x[i : i + chunk].astype(np.float64), y[i : i + chunk].astype(np.float64)
        d = a - b
        max_abs = max(max_abs, float(np.max(np.abs(d))))
        delta2, x2, y2, dot = delta2 + d @ d, x2 + a @ a, y2 + b @ b, dot + a @ b
    norm_x, norm_y = np.sqrt(x2), np.sqrt(y2)
    return {
        "max_abs": max_abs,
        "rel_rms": float(np.sqrt(delta2) / norm_x) if norm_x else float(np.sqrt(delta2)),
        "cosine": float(dot / (norm_x * norm_y)) if norm_x and norm_y else float(norm_x == norm_y),
    }


def diff(path_a: str | os.PathLike, path_b: str | os.PathLike, values: bool = True) -> dict[str, Any]:
    """The differences between two model files as a JSON-able dict (`values=False` skips the
    dequantized comparison)."""
    a, b = _load(path_a), _load(path_b)
    both = [k for k in a.metadata if k in b.metadata]
    meta = {
        "changed": {
            k: [a.metadata[k], b.metadata[k]] for k in both if not _same(a.metadata[k], b.metadata[k])
        },
        "only_a": {k: v for k, v in a.metadata.items() if k not in b.metadata},
        "only_b": {k: v for k, v in b.metadata.items() if k not in a.metadata},
    }
    pairs, only_a, only_b = _pairs(a.tensors, b.tensors)
    changed, identical = [], 0
    for x, y, how in pairs:
        if (
            x.type == y.type
            and x.shape == y.shape
            and x.quantization == y.quantization
            and np.array_equal(x.raw, y.raw)
        ):
            identical += 1
            continue
        entry: dict[str, Any] = {"a": x.name, "b": y.name, "matched_by": how}
        for field in ("type", "shape", "quantization"):
            if getattr(x, field) != getattr(y, field):
                entry[field] = [_plain(getattr(x, field)), _plain(getattr(y, field))]
        if values and x.shape == y.shape:
            entry.update(_numbers(x.values(), y.values()))
        changed.append(entry)
    return {
        "a": {"file": str(path_a), "format": a.format, "tensors": len(a.tensors)},
        "b": {"file": str(path_b), "format": b.format, "tensors": len(b.tensors)},
        "metadata": meta,
        "parts": {
            "only_a": [p for p in a.parts if p not in b.parts],
            "only_b": [p for p in b.parts if p not in a.parts],
        },
        "tensors": {
            "identical": identical,
            "changed": changed,
            "only_a": [t.name for t in only_a],
            "only_b": [t.name for t in only_b],
            "matched_by_shape": sum(how == "shape" for _, _, how in pairs),
        },
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def is_empty(d: dict[str, Any]) -> bool:
    m, t = d["metadata"], d["tensors"]
    return not (
        m["changed"] or m["only_a"] or m["only_b"] or d["parts"]["only_a"] or d["parts"]["only_b"]
    ) and not (t["changed"] or t["only_a"] or t["only_b"])


def render(d: dict[str, Any]) -> str:
    from .inspection import short_text

    lines = [f"A: {d['a']['file']} ({d['a']['format']}, {d['a']['tensors']} tensors)"]
    lines.append(f"B: {d['b']['file']} ({d['b']['format']}, {d['b']['tensors']} tensors)")
    if is_empty(d):
        lines.append("\nno differences")
        return "\n".join(lines)
    m = d["metadata"]
    if m["changed"] or m["only_a"] or m["only_b"]:
        lines.append("\nmetadata:")
        lines += [
            f"  ~ {k}: {short_text(va, 60)} -> {short_text(vb, 60)}" for k, (va, vb) in m["changed"].items()
        ]
        lines += [f"  - {k}: {short_text(v, 100)}  (only in A)" for k, v in m["only_a"].items()]
        lines += [f"  + {k}: {short_text(v, 100)}  (only in B)" for k, v in m["only_b"].items()]
    for side, mark in (("only_a", "A"), ("only_b", "B")):
        for part in d["parts"][side]:
            lines.append(f"{'-' if mark == 'A' else '+'} section/entry only in {mark}: {part}")
    t = d["tensors"]
    by_shape = t["matched_by_shape"]
    lines.append(
        f"\ntensors: {t['identical']} identical, {len(t['changed'])} differ, {len(t['only_a'])} only in A, "
        f"{len(t['only_b'])} only in B"
        + (f"; {by_shape} pairs matched by shape and position, as names differ" if by_shape else "")
    )
    for c in t["changed"]:
        name = c["a"] if c["a"] == c["b"] else f"{c['a']} ~ {c['b']}"
        what = [f"{f} {c[f][0]} -> {c[f][1]}" for f in ("type", "shape", "quantization") if f in c]
        if "rel_rms" in c:
            what.append(f"max |Δ| {c['max_abs']:.3g}, rel RMS {c['rel_rms']:.3%}, cosine {c['cosine']:.6f}")
        lines.append(f"  ~ {name}: " + "; ".join(what))
    lines += [f"  - {n}  (only in A)" for n in t["only_a"]]
    lines += [f"  + {n}  (only in B)" for n in t["only_b"]]
    return "\n".join(lines)
