"""The op set in backends/base.py is the whole interface between models and backends: both backends
implement every op with its signature, architecture files call nothing else, and nothing outside
backends/ branches on a backend's name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from pocketlm.backends.base import ALL_CAPABILITIES, Backend
from pocketlm.backends.cpu import CpuBackend

SRC = Path(__file__).resolve().parent.parent / "src" / "pocketlm"
OPS = {
    name for name, member in vars(Backend).items() if inspect.isfunction(member) and not name.startswith("_")
}


def backends():
    yield CpuBackend
    wgpu = pytest.importorskip("wgpu")  # noqa: F841 (the webgpu module imports it)
    from pocketlm.backends.webgpu import WebGPUBackend

    yield WebGPUBackend


@pytest.mark.parametrize("index", [0, 1], ids=["cpu", "webgpu"])
def test_each_backend_implements_every_op_with_its_signature(index):
    backend = list(backends())[index]
    for op in sorted(OPS):
        expected = list(inspect.signature(getattr(Backend, op)).parameters)
        implemented = getattr(backend, op, None)
        assert implemented is not None, f"{backend.__name__} lacks {op}"
        got = list(inspect.signature(implemented).parameters)
        if got[:1] != ["self"]:  # a staticmethod
            got = ["self", *got]
        assert got == expected, (backend.__name__, op, got, expected)
    assert backend.capabilities <= ALL_CAPABILITIES


def test_architecture_files_call_only_the_op_set():
    used = {}
    for path in sorted((SRC / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ops"
            ):
                used.setdefault(node.attr, set()).add(path.name)
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "getattr"
                and getattr(node.args[0], "id", None) == "ops"
            ):  # getattr(ops, activation): silu, gelu_tanh, gelu
                used.setdefault("<activation>", set()).add(path.name)
    assert set(used) - {"<activation>"} <= OPS, {op: files for op, files in used.items() if op not in OPS}
    assert {"silu", "gelu_tanh", "gelu"} <= OPS


def test_nothing_outside_backends_branches_on_a_backend_name():
    for path in SRC.rglob("*.py"):
        if "backends" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Attribute)
                and node.left.attr == "name"
                and getattr(node.left.value, "attr", getattr(node.left.value, "id", "")) == "ops"
            ):
                pytest.fail(f"{path.relative_to(SRC)}:{node.lineno} compares a backend's name")
