"""A web package run the way the browser runtime (`browser/src/runtime.js`) runs it, in Python, on a
wgpu device: every buffer of the plan created and filled from the shards, each kernel compiled from
the plan's WGSL with the plan's bind group layout, and a pass replayed by `Device.replay` (as the
backend replays its own recorded decode step) with its position and tokens in the step buffer,
the logits read back; the rows of tables a pass reads (its `fills`) are read from the package's
table files and dequantized before it runs. The package's other reader is runtime.js; the tests
check both against the native backends."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..backends.webgpu.backend import table_rows
from ..backends.webgpu.device import Device
from ..errors import InvalidOptionError
from ..formats.quants import dequantize, ggml_type


class PackageRunner:
    """`run(pass_name, tokens, position) -> logits` of the last token; `passes[name][0]` is how
    many tokens a pass takes."""

    def __init__(self, package: str | os.PathLike):
        from . import FORMAT

        package = Path(package)
        plan = json.loads((package / "plan.json").read_text())
        if plan.get("format") != FORMAT:
            raise InvalidOptionError(
                f"{package} holds a plan of format {plan.get('format')}; this version reads {FORMAT}: export it again"
            )
        self.device = device = Device()
        if device.step.size < 4 * plan["step_capacity"]:
            device.step = device.buffer(4 * plan["step_capacity"], "step")
        self.buffers = {}
        for b in plan["buffers"]:
            data = None
            if "shard" in b:
                with open(package / b["shard"], "rb") as f:
                    f.seek(b["offset"])
                    data = f.read(b["length"])
            if b["id"] == plan["step"]:
                self.buffers[b["id"]] = device.step
            elif b["uniform"]:
                self.buffers[b["id"]] = device.uniform(data)
            else:
                values = np.frombuffer(data, np.uint8) if data is not None else None
                self.buffers[b["id"]] = device.buffer(b["size"], "package", values)
        for name, code in plan["kernels"].items():
            device.pipeline(name, code, tuple(plan["bindings"][name]))
        self.tables = {
            name: (t, [(p["first_row"], np.memmap(package / p["file"], np.uint8, "r")) for p in t["pieces"]])
            for name, t in plan.get("tables", {}).items()
        }
        self.passes, self.fills = {}, {}
        for name, recorded in plan["passes"].items():
            self.fills[name] = recorded.get("fills", [])
            commands = [
                (
                    device.pipeline(kernel),
                    device.bind(kernel, [self.buffers[i] for i in (params, *ids)]),
                    tuple(groups),
                )
                for kernel, params, ids, groups in recorded["dispatches"]
            ]
            self.passes[name] = (recorded["tokens"], commands, recorded["logits"])

    def feed(self, tokens: list[int], position: int) -> np.ndarray:
        """The logits after `tokens` fed from `position` as the runtime feeds a prompt: bands of the
        widest prefill pass that fits, then of the narrower ones, then the decode pass a token at a time."""
        bands = sorted(
            (n for n, (size, _, _) in self.passes.items() if size > 1), key=lambda n: -self.passes[n][0]
        )
        at, logits = 0, None
        for name in bands:
            size = self.passes[name][0]
            while at + size <= len(tokens):
                logits = self.run(name, tokens[at : at + size], position + at)
                at += size
        for i in range(at, len(tokens)):
            logits = self.run("decode", [tokens[i]], position + i)
        return logits

    def run(self, name: str, tokens: list[int], position: int) -> np.ndarray:
        """The logits after pass `name` over `tokens` (exactly as many as it takes) at `position`."""
        n_tokens, commands, logits = self.passes[name]
        if len(tokens) != n_tokens:
            raise ValueError(f"the {name} pass takes {n_tokens} tokens, not {len(tokens)}")
        self.device.set_step(position, np.asarray(tokens))
        for fill in self.fills[name]:
            values = self._rows(fill, tokens)
            self.device.device.queue.write_buffer(self.buffers[fill["buffer"]].gpu, 4 * fill["at"], values)
        self.device.replay(commands)
        out = self.buffers[logits["buffer"]]
        return self.device.finish(out, 4 * logits["offset"], 4 * logits["count"]).view(np.float32)

    def _rows(self, fill: dict, tokens: list[int]) -> np.ndarray:
        """The rows of a table that `fill` reads for `tokens`, as float32."""
        table, pieces = self.tables[fill["table"]]
        rows = table_rows(fill["table"], table["rows"], tokens, fill["stride"], fill["offset"], fill["limit"])
        size = table["row_bytes"]
        raw = np.empty((len(rows), size), np.uint8)
        for i, row in enumerate(rows.tolist()):
            first, data = next((first, data) for first, data in reversed(pieces) if first <= row)
            raw[i] = data[(row - first) * size : (row - first + 1) * size]
        return dequantize(raw, ggml_type(table["type"]), (len(rows), table["cols"]))
