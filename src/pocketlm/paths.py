"""Where pocketlm keeps what it fetches and builds (models, tokenizer tables, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """pocketlm's folder for pulled models and caches: $POCKETLM_HOME, else ~/.cache/pocketlm."""
    home = os.environ.get("POCKETLM_HOME")
    return Path(home) if home else Path.home() / ".cache" / "pocketlm"
