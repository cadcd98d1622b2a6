#!/usr/bin/env bash
# The whole test suite on a fresh machine: Debian's Chromium for the browser tests and Mesa's
# Vulkan driver (lavapipe: WebGPU on the CPU for wgpu), a virtual environment with the test extras
# (transformers + torch as the reference, wgpu, llama-cpp-python as the peer, built from source in
# about 4 minutes, LiteRT-LM where its wheel installs), the web runtime's bundle, ruff's lint and format checks, then pytest. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if [ ! -x /usr/bin/chromium ] || ! ldconfig -p | grep -q libvulkan.so.1; then
    apt-get update -qq && apt-get install -y -qq chromium mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e ".[test,llamacpp]"
# LiteRT-LM (Google's runtime) has wheels for some platforms only: its tests skip without it
pip install -q -e ".[litertlm]" || echo "LiteRT-LM does not install here; its side-by-side tests are skipped"
if command -v npm >/dev/null; then scripts/build_web.sh; fi
ruff check src tests benchmarks scripts setup.py
ruff format --check src tests benchmarks scripts setup.py
python -m pytest "$@"
