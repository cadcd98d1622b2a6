#!/usr/bin/env bash
# The whole test suite on a fresh machine: Debian's Chromium for the browser test, a virtual
# environment with the test extras (transformers + torch as the reference, llama-cpp-python as the
# peer, built from source in about 4 minutes), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e ".[test,llamacpp]"
python -m pytest "$@"
