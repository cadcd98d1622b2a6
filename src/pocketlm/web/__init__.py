"""The web package: a model as the browser runs it, exported from the same model code.

    export("model.gguf", "out/")  ->  out/manifest.json, out/plan.json, out/shard-000.bin, ...,
                                      out/tokenizer.json, out/vocab.json

The WebGPU backend records two passes of the model's own forward pass, each reading its position
and tokens from the step buffer: prefill over 512, 128 and PREFILL_TOKENS tokens (those the context
holds; a prompt is fed in bands of the widest that fit, then one token at a time), and decode (one
token). The plan
lists every buffer they touch (weights, cos/sin tables, parameter blocks, KV caches, scratch) and
each pass's dispatches in order (kernel, parameter block, buffers, workgroups), with the WGSL
source of each kernel. Tables a model reads a few rows of per token (Gemma 3n's and Gemma 4's
per-layer inputs, gigabytes in the released models) are no GPU buffer: their rows stay as the
GGUF file holds them in the package's `table-*.bin` files, and each pass's `fills` say which rows
of which table go, dequantized to float32, into which buffer before the pass runs (row = token *
stride + offset, token 0 for ids at or past the limit). The browser runtime (`static/`) knows
no architecture: it creates the buffers, fills them from the shards, and replays the dispatches
once per token, reading back the logits. `vocab.json` (each token's string, control tokens empty)
is what the runtime's grammar engine reads when a reply must follow a JSON schema.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..engine import LoadedModel
from ..errors import InvalidOptionError

SHARD_BYTES = 256 * 1024 * 1024  # shards the browser fetches and caches one at a time
# prefill passes, widest first: a prompt is fed in bands of the widest that fits, then narrower ones,
# then one token at a time (each pass's logits are read back: wide bands, few passes, on long prompts)
WIDE_PREFILL = (("prefill_512", 512), ("prefill_128", 128))
PREFILL_TOKENS = 16
ALIGN = 256
FORMAT = 4  # 2: each kernel's bind group layout written out (`bindings`); 3: tables read by rows;
# 4: the top-k kernels (`top`) and argmax, which the page runs after a pass to read back k logits, not
# the vocabulary, and to chain greedy steps on the GPU


DEFAULT_MAX_TOKENS = 1024


def default_max_tokens(model: str | os.PathLike) -> int:
    """1024, or the model's context length when shorter."""
    from ..formats.gguf import GGUFFile, arch_key

    f = GGUFFile(model)
    context = f.get(arch_key(f.architecture, "context_length"))
    return min(DEFAULT_MAX_TOKENS, int(context)) if context else DEFAULT_MAX_TOKENS


def export(
    model: str | os.PathLike, out: str | os.PathLike, max_tokens: int | None = None, progress: bool = True
) -> Path:
    """Write the web package of a GGUF model into folder `out` (replaced when complete);
    `max_tokens` is the browser's context (default: 1024 or the model's, if shorter)."""
    max_tokens = max_tokens or default_max_tokens(model)
    from ..backends.webgpu.backend import TOP_K, TOP_K_PASSES, TOP_TIES
    from ..backends.webgpu.device import binding_types, wgsl_constants, wgsl_source

    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists():
        raise InvalidOptionError(f"{out} exists and is not a web package; choose a new folder")
    lm = LoadedModel(model, backend="webgpu", keep_host_copies=True)
    cache = lm.make_cache(max_tokens)
    device = lm.ops.device
    # The prefill pass first: its scratch buffers are the larger ones, which the decode pass reuses.
    passes, tables = {}, {}
    for name, n_tokens in (*WIDE_PREFILL, ("prefill", PREFILL_TOKENS), ("decode", 1)):
        if n_tokens > max_tokens:
            continue
        cache.clear()
        zeros = np.zeros(n_tokens, np.int64)
        recorded = lm.ops.record(lambda: lm.model.forward(lm.ops, zeros, cache))  # noqa: B023 (run at once)
        logits = recorded.out
        lm.ops.to_host(logits)  # runs the pass once (and checks that it runs)
        passes[name] = {
            "tokens": n_tokens,
            "dispatches": [[k, params, ids, list(groups)] for k, params, ids, groups in recorded.trace],
            "logits": {"buffer": logits.buf.id, "offset": logits.offset, "count": logits.size},
            "fills": [
                {
                    "table": w.name,
                    "stride": stride,
                    "offset": offset,
                    "limit": limit,
                    "buffer": y.buf.id,
                    "at": y.offset,
                }
                for w, stride, offset, limit, y in recorded.fills
            ],
        }
        tables.update({w.name: w for w, *_ in recorded.fills})

    used = {device.step.id} | {p["logits"]["buffer"] for p in passes.values()}
    used |= {i for p in passes.values() for _, params, ids, _ in p["dispatches"] for i in (params, *ids)}
    used |= {f["buffer"] for p in passes.values() for f in p["fills"]}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    buffers = _write_shards(tmp, [device.buffers[i] for i in sorted(used)], progress)
    table_files = {
        name: _write_table(tmp, f"table-{i:03d}", name, w, progress)
        for i, (name, w) in enumerate(sorted(tables.items()))
    }
    after = {kernel for kernel, _, _ in TOP_K_PASSES} | {"argmax"}  # run after a pass by the page
    kernels = sorted({d[0] for p in passes.values() for d in p["dispatches"]} | after)
    plan = {
        "format": FORMAT,
        "kernels": {k: wgsl_source(k) for k in kernels},
        "bindings": {k: binding_types(k) for k in kernels},
        "buffers": buffers,
        "tables": table_files,
        "passes": passes,
        "step": device.step.id,
        "step_capacity": device.step.size // 4,
        "top": {  # topk.wgsl's dispatches after a pass, see WebGPUBackend.top_logits
            "passes": [list(p) for p in TOP_K_PASSES],
            "max_k": TOP_K,
            "ties": TOP_TIES,
            **wgsl_constants("topk+gather", "TOP"),  # pairs: where they start; per_group: logits a workgroup
        },
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    tok = lm.tokenizer
    (tmp / "tokenizer.json").write_text(tok.to_json())
    tokens = ["" if i in tok.control_ids else (tok.token(i) or "") for i in range(tok.vocab_size)]
    vocab_type = "byte_level" if tok.model == "gpt2" else "byte_fallback"  # how XGrammar decodes the strings
    # Tokens that never belong in compact JSON but XGrammar's strings admit: raw control characters,
    # and bytes no UTF-8 text holds (C0, C1, F5-FF: web-xgrammar 0.1.27 reads F5-F7 as the lead of a
    # 4-byte character, so a sampled string came out as invalid UTF-8). The tokens whose bytes start
    # with a digit (`<0x39>` among them) are what the 16-digit cap masks.
    table = tok.token_bytes()
    never = [
        i
        for i, b in enumerate(table)
        if not b.startswith(b"\xff") and any(c < 0x20 or c in (0xC0, 0xC1) or c >= 0xF5 for c in b)
    ]
    digits = [i for i, b in enumerate(table) if b[:1].isdigit()]
    vocab = {"type": vocab_type, "tokens": tokens, "never": never, "digit_first": digits}
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps({}))
    manifest = {
        "format": FORMAT,
        "model": lm.path.name,
        "architecture": lm.architecture,
        "max_tokens": max_tokens,
        "vocab_size": lm.model.vocab_size,
        "bos_id": tok.bos_id if tok.add_bos else None,
        "stop_ids": sorted(int(i) for i in tok.stop_ids),
        "chat": _chat_pieces(lm),
        "shards": sorted({b["shard"] for b in buffers if "shard" in b}),
        "table_files": [piece["file"] for t in table_files.values() for piece in t["pieces"]],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _bytes_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)


def _write_shards(folder: Path, buffers, progress: bool) -> list[dict]:
    """Buffer descriptions; initial contents (weights, tables, parameters) go into the shards."""
    described, shard, offset, handle = [], -1, SHARD_BYTES, None
    total = sum(b.data.nbytes for b in buffers if b.data is not None)
    with _bytes_bar(total, "writing shards", progress) as bar:
        for b in buffers:
            entry = {"id": b.id, "size": b.size, "uniform": b.role == "params"}
            if b.data is not None:
                raw = np.ascontiguousarray(b.data).view(np.uint8).ravel()
                if offset + raw.nbytes > SHARD_BYTES:
                    if handle:
                        handle.close()
                    shard, offset = shard + 1, 0
                    handle = open(folder / f"shard-{shard:03d}.bin", "wb")
                handle.write(raw.tobytes())
                pad = -raw.nbytes % ALIGN
                handle.write(b"\0" * pad)
                entry.update(shard=f"shard-{shard:03d}.bin", offset=offset, length=raw.nbytes)
                offset += raw.nbytes + pad
                bar.update(raw.nbytes)
            described.append(entry)
    if handle:
        handle.close()
    return described


def _write_table(folder: Path, stem: str, name: str, w, progress: bool) -> dict:
    """A table read by rows: its bytes as the model file holds them, in files of whole rows (at most
    SHARD_BYTES each, one row at least); returns its description for the plan."""
    n_rows, cols = w.shape
    row_bytes = w.nbytes // n_rows
    per_file = max(1, SHARD_BYTES // row_bytes)
    rows = np.asarray(w.data).reshape(n_rows, row_bytes)
    pieces = []
    with _bytes_bar(w.nbytes, f"writing {name}", progress) as bar:
        for first in range(0, n_rows, per_file):
            part = rows[first : first + per_file]
            file = f"{stem}-{len(pieces):03d}.bin"
            part.tofile(folder / file)  # straight from the file's pages, no copy
            pieces.append({"file": file, "first_row": first, "rows": len(part)})
            bar.update(part.nbytes)
    return {"type": int(w.type), "rows": n_rows, "cols": cols, "row_bytes": row_bytes, "pieces": pieces}


def _chat_pieces(lm: LoadedModel) -> dict | None:
    """The chat template cut around sentinel messages: a first user turn is first[0] + text +
    first[1]; a later one, after the reply, is next[0] + text + next[1]."""
    marks = ["\ue000", "\ue001", "\ue002"]
    messages = [
        {"role": "user", "content": marks[0]},
        {"role": "assistant", "content": marks[1]},
        {"role": "user", "content": marks[2]},
    ]
    try:
        text = lm.tokenizer.apply_chat_template(messages, True, lm.architecture)
    except Exception:
        return None
    if not all(text.count(m) == 1 for m in marks):
        return None
    head, rest = text.split(marks[0])
    after_first, rest = rest.split(marks[1])
    between, tail = rest.split(marks[2])
    first_text = lm.tokenizer.apply_chat_template(messages[:1], True, lm.architecture)
    first_tail = first_text.split(marks[0])[1]
    return {"first": [head, first_tail], "next": [between, tail]}


STATIC = Path(__file__).parent / "static"


def runtime_ready() -> bool:
    return (STATIC / "worker.js").exists()


def package_current(package: Path) -> bool:
    """Whether `package` holds a complete package of the format this version writes (an older one is
    exported again: the runtime refuses other formats)."""
    try:
        return json.loads((package / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def package_dir(model_path: Path, max_tokens: int) -> Path:
    """Where `pocketlm web` keeps the package of a model file: next to the pulled models."""
    from ..paths import models_dir

    return models_dir().parent / "web" / f"{model_path.stem}-ctx{max_tokens}"


def create_app(package: Path):
    """The runtime's static files at /, the package under /model/ (127.0.0.1 by default)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    if not runtime_ready():
        raise InvalidOptionError(
            "the browser runtime is not in this install: it is bundled when the package is built on a machine with "
            "npm (pip install . there), or by scripts/build_web.sh in a checkout"
        )
    return Starlette(
        routes=[
            Mount("/model", StaticFiles(directory=package)),
            Mount("/", StaticFiles(directory=STATIC, html=True)),
        ]
    )
