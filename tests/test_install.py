"""Every command works after the README's install: the wheel, built as a user's `pip install .` builds it,
installed into a fresh virtual environment outside the checkout, serves `pocketlm web`'s page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    shutil.which("npm") is None, reason="the package build bundles the browser runtime with npm"
)
def test_the_installed_wheel_serves_pocketlm_web_outside_the_checkout(tiny, tmp_path):
    dist, venv, home = tmp_path / "dist", tmp_path / "venv", tmp_path / "home"
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # noqa: E731
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT))
    (wheel,) = dist.glob("pocketlm-*.whl")
    run(sys.executable, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "-q", str(wheel))
    port = _free_port()
    env = {**os.environ, "POCKETLM_HOME": str(home)}
    env.pop("PYTHONPATH", None)
    server = subprocess.Popen(
        [
            str(venv / "bin" / "pocketlm"),
            "web",
            str(tiny("llama")[2]),
            "--port",
            str(port),
            "--max-tokens",
            "64",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.time() < deadline, "pocketlm web did not serve its page"
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        worker = httpx.get(f"http://127.0.0.1:{port}/worker.js", timeout=10)
        manifest = httpx.get(f"http://127.0.0.1:{port}/model/manifest.json", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert worker.status_code == 200 and len(worker.content) > 100_000  # the bundled runtime
        assert manifest.status_code == 200 and manifest.json()["max_tokens"] == 64
    finally:
        server.terminate()
        server.wait(30)
