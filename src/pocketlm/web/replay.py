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

from ..backends.webgpu.backend import TopK, table_rows
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
        self.top_k, self.top = plan["top"]["max_k"], None  # run_top's largest k; its kernels' buffers
        self._greedy, self._flip, self._ahead = None, 0, None  # greedy_next's buffers and step run ahead
        self.max_tokens = json.loads((package / "manifest.json").read_text())["max_tokens"]
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
        logits = self._encode(name, tokens, position)
        out = self.buffers[logits["buffer"]]
        return self.device.finish(out, 4 * logits["offset"], 4 * logits["count"]).view(np.float32)

    def run_top(
        self, name: str, tokens: list[int], position: int, k: int
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """As `run`, then as the page does to sample (greedy: k = 1): the k largest logits chosen on the
        GPU by the plan's top-k kernels, (ids, logits) in id order; (None, the whole row) where k is
        out of the plan's range or the GPU could not choose them."""
        logits = self._encode(name, tokens, position)
        out, count = self.buffers[logits["buffer"]], logits["count"]
        if 0 < k < min(count, self.top_k + 1):
            self.top = self.top or TopK(self.device)
            found = self.top(out, logits["offset"], count, k)
            if found is not None:
                return found
        return None, self.device.finish(out, 4 * logits["offset"], 4 * count).view(np.float32)

    def greedy_next(self, token: int, position: int) -> int:
        """As the page decodes greedily: the decode pass over `token` at `position`, then argmax.wgsl,
        which leaves the next token and position in the step buffer, so the step after is submitted
        (fed on the GPU) before this one is read back; the next token (-1: a logit not finite). A step
        submitted ahead and not asked for is left behind: the next pass writes over what it did."""
        current, self._ahead = self._ahead, None
        if current is None or current[1:] != (token, position):
            self.device.set_step(position, np.asarray([token]))
            current = (self._submit_greedy(write_step=True), token, position)
        ahead = self._submit_greedy(write_step=False) if position + 1 < self.max_tokens else None
        value, bad = self.device.read(current[0], 8).view(np.uint32)
        self._ahead = (ahead, int(value), position + 1) if ahead is not None else None
        return -1 if bad else int(value)

    def _submit_greedy(self, write_step: bool):
        """Submit the decode pass and argmax; the read-back buffer its token will be copied to."""
        if self._greedy is None:
            self._greedy = (
                self.device.buffer(16, "data"),
                [self.device.readback_buffer(16) for _ in range(2)],
            )
        out, reads = self._greedy
        self._flip ^= 1
        _, commands, logits = self.passes["decode"]
        self.device.replay(commands)
        params = dict(n=logits["count"], l_off=logits["offset"])
        self.device.dispatch(
            "argmax", params, [self.buffers[logits["buffer"]], self.device.step, out], (1, 1, 1)
        )
        self.device.submit([(out, 0, reads[self._flip], 8)], write_step=write_step)
        return reads[self._flip]

    @property
    def chains(self) -> bool:
        """Whether greedy steps can be chained on the GPU (no table rows for the host to copy in)."""
        return not self.fills["decode"]

    def _encode(self, name: str, tokens: list[int], position: int) -> dict:
        """Encode pass `name` over `tokens` at `position` (with the table rows it reads); its logits."""
        n_tokens, commands, logits = self.passes[name]
        if len(tokens) != n_tokens:
            raise ValueError(f"the {name} pass takes {n_tokens} tokens, not {len(tokens)}")
        self._ahead = None  # the step buffer is the host's again: a greedy step run ahead is stale
        self.device.set_step(position, np.asarray(tokens))
        for fill in self.fills[name]:
            values = self._rows(fill, tokens)
            self.device.device.queue.write_buffer(self.buffers[fill["buffer"]].gpu, 4 * fill["at"], values)
        self.device.replay(commands)
        return logits

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
