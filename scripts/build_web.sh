#!/usr/bin/env bash
# Bundle the browser runtime (browser/src + @huggingface/tokenizers from npm) into
# src/pocketlm/web/static/worker.js, which `pocketlm web` serves. Needs Node.js and npm.
set -euo pipefail
cd "$(dirname "$0")/../browser"
npm ci --silent --no-audit --no-fund
npm run --silent build
