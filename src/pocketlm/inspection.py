"""`pocketlm inspect`: what a model file holds, for GGUF, .litertlm, .task and .tflite files alike.

`describe(path)` returns a JSON-able dict (what `--json` prints); `render(description)` the text a
person reads: header and version, metadata, sections or entries with their decoded metadata and
tokenizer, every TFLite model's subgraphs and signatures, and a tensor table with totals per type.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from .errors import ModelFileError


def file_format(path: str | os.PathLike) -> str:
    """gguf, litertlm, task or tflite, from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open as a model file ({e.strerror})") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:8] == b"LITERTLM":
        return "litertlm"
    if b"PK\x03\x04" in head:  # a ZIP; MediaPipe pads its start so that entries are aligned
        if _is_task(path):
            return "task"
        raise ModelFileError(f"{path}: a ZIP archive without TF_LITE_* entries: not a MediaPipe .task bundle")
    if head[4:8] == b"TFL3":
        return "tflite"
    raise ModelFileError(f"{path}: not a model file pocketlm reads (GGUF, .litertlm, .task or .tflite)")


def _is_task(path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.startswith("TF_LITE_") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return True  # a damaged bundle: its reader says what is wrong


def describe(path: str | os.PathLike) -> dict[str, Any]:
    fmt = file_format(path)
    if fmt == "gguf":
        return _gguf(path)
    if fmt == "litertlm":
        from .formats.litertlm import open_litertlm

        f = open_litertlm(path)
        return {
            "file": str(f.path),
            "format": "litertlm",
            "version": ".".join(map(str, f.version)),
            "size": f.size,
            "header_bytes": f.header_end,
            "system_metadata": f.system_metadata,
            "sections": [
                {
                    "index": s.index,
                    "data_type": s.data_type,
                    "items": s.items,
                    "begin": s.begin,
                    "end": s.end,
                    **({"metadata": s.decoded} if s.decoded is not None else {}),
                    **({"tokenizer": s.tokenizer} if s.tokenizer else {}),
                    **({"tflite": _tflite(s.tflite)} if s.tflite else {}),
                }
                for s in f.sections
            ],
        }
    if fmt == "task":
        from .formats.task import open_task

        t = open_task(path)
        return {
            "file": str(t.path),
            "format": "task",
            "size": t.size,
            "entries": [
                {
                    "name": e.name,
                    "begin": e.begin,
                    "size": e.size,
                    **({"metadata": e.decoded} if e.decoded is not None else {}),
                    **({"tokenizer": e.tokenizer} if e.tokenizer else {}),
                    **({"tflite": _tflite(e.tflite)} if e.tflite else {}),
                }
                for e in t.entries
            ],
        }
    from .formats.tflite import open_tflite

    model = open_tflite(path)
    return {"file": str(path), "format": "tflite", "size": model.size, "tflite": _tflite(model)}


def _totals(tensors: list[dict]) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    for t in tensors:
        totals[t["type"]]["tensors"] += 1
        totals[t["type"]]["bytes"] += t["bytes"]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]["bytes"]))


def _tflite(model) -> dict[str, Any]:
    tensors = [
        {
            "name": t.name,
            "type": t.type,
            "shape": list(t.shape),
            "quantization": t.quantization.describe(),
            "bytes": t.nbytes,
        }
        for t in model.weights()
    ]
    signatures = []
    for s in model.signatures:
        graph = model.subgraphs[s.subgraph]
        signatures.append(
            {
                "key": s.key,
                "subgraph": s.subgraph,
                "inputs": {name: _io(graph.tensors[i]) for name, i in s.inputs.items()},
                "outputs": {name: _io(graph.tensors[i]) for name, i in s.outputs.items()},
                "kv_cache_inputs": sum(name.startswith("kv_cache") for name in s.inputs),
            }
        )
    return {
        "version": model.version,
        "description": model.description,
        "bytes": model.size,
        "external_buffers": model.external_buffers,
        "subgraphs": [
            {"name": g.name, "tensors": len(g.tensors), "operators": g.operators} for g in model.subgraphs
        ],
        "signatures": signatures,
        "tensors": tensors,
        "totals": _totals(tensors),
    }


def _io(tensor) -> str:
    return f"{tensor.type} {list(tensor.shape)}"


def _gguf(path) -> dict[str, Any]:
    from .formats.gguf import GGUFFile

    f = GGUFFile(path)
    tensors = [
        {"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.nbytes}
        for t in f.tensors.values()
    ]
    return {
        "file": str(f.path),
        "format": "gguf",
        "version": f.version,
        "size": f.size,
        "parts": len(f.parts),
        "metadata": {key: _short(value) for key, value in f.metadata.items()},
        "tensors": tensors,
        "totals": _totals(tensors),
        "parameters": sum(t.n_elements for t in f.tensors.values()),
    }


def _short(value: Any) -> Any:
    """Metadata values as JSON: long arrays (vocabularies) cut to their first items and a count."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value[:8]] + ([f"... ({len(value)} items)"] if len(value) > 8 else [])
    if isinstance(value, bytes):
        return value.hex()
    return value


# -- text -----------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} B"


def short_text(value: Any, width: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def render(d: dict[str, Any]) -> str:
    lines: list[str] = []
    out = lines.append
    fmt = d["format"]
    if fmt == "gguf":
        parts = f", {d['parts']} parts" if d["parts"] > 1 else ""
        out(f"{d['file']}  (GGUF v{d['version']}, {_mb(d['size'])}{parts}, {len(d['tensors'])} tensors)\n")
        out("metadata:")
        for key, value in d["metadata"].items():
            out(f"  {key:<48} {short_text(repr(value) if isinstance(value, str) else value)}")
        _tensor_table(d, out, quantization=False)
        out(f"  {d['parameters'] / 1e6:.1f}M parameters")
    elif fmt == "litertlm":
        out(f"{d['file']}  (.litertlm v{d['version']}, {_mb(d['size'])}, {len(d['sections'])} sections)\n")
        out("system metadata:")
        for key, value in d["system_metadata"].items():
            out(f"  {key:<32} {short_text(value)}")
        for s in d["sections"]:
            items = ", ".join(f"{k}={v}" for k, v in s["items"].items())
            out(
                f"\nsection {s['index']}: {s['data_type']}  bytes {s['begin']}..{s['end']} ({_mb(s['end'] - s['begin'])})"
            )
            if items:
                out(f"  {items}")
            _payload(s, out)
    elif fmt == "task":
        out(f"{d['file']}  (.task bundle, {_mb(d['size'])}, {len(d['entries'])} entries)")
        for e in d["entries"]:
            out(f"\nentry {e['name']}  at byte {e['begin']} ({_mb(e['size'])})")
            _payload(e, out)
    else:
        out(f"{d['file']}  (.tflite, {_mb(d['size'])})")
        _tflite_text(d["tflite"], out)
    return "\n".join(lines)


def _payload(part: dict, out) -> None:
    for key, value in (part.get("metadata") or {}).items():
        out(f"  {key:<28} {short_text(value)}")
    if tok := part.get("tokenizer"):
        model = f", {tok['model']}" if tok.get("model") else ""
        added = f" + {tok['added_tokens']} added" if tok.get("added_tokens") else ""
        out(f"  tokenizer: {tok['kind']}{model}, {tok['vocab_size']} tokens{added}")
    if "tflite" in part:
        _tflite_text(part["tflite"], out)


def _tflite_text(t: dict, out) -> None:
    n = t["external_buffers"]
    external = f", {n} buffer{'s' if n > 1 else ''} stored after the FlatBuffer" if n else ""
    out(f"  TFLite v{t['version']}: {len(t['subgraphs'])} subgraphs{external}")
    for s in t["signatures"]:
        kv = f", {s['kv_cache_inputs']} KV-cache inputs" if s["kv_cache_inputs"] else ""
        names = ", ".join(list(s["inputs"])[:6]) + (", ..." if len(s["inputs"]) > 6 else "")
        out(f"  signature {s['key']!r}: subgraph {s['subgraph']}, {len(s['inputs'])} inputs ({names}){kv}")
    _tensor_table(t, out, quantization=True, indent="  ")


def _tensor_table(d: dict, out, quantization: bool, indent: str = "") -> None:
    quant = f" {'quantization':<22}" if quantization else ""
    out(f"\n{indent}{'tensor':<48} {'type':<8} {'shape':<20}{quant} {'bytes':>12}")
    for t in d["tensors"]:
        name = t["name"] if len(t["name"]) <= 48 else "..." + t["name"][-45:]
        q = f" {t['quantization']:<22}" if quantization else ""
        out(f"{indent}{name:<48} {t['type']:<8} {str(t['shape']):<20}{q} {t['bytes']:>12,}")
    out(f"{indent}totals per type:")
    for type_name, total in d["totals"].items():
        out(f"{indent}  {type_name:<8} {total['tensors']:>5} tensors {total['bytes'] / 1e6:>10.2f} MB")
    count, size = len(d["tensors"]), sum(t["bytes"] for t in d["tensors"])
    out(f"{indent}  {'all':<8} {count:>5} tensors {size / 1e6:>10.2f} MB")
