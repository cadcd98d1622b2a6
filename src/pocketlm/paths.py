"""Where pocketlm keeps what it fetches and builds (models, tokenizer tables, compiled kernels), and the
checksum of what it fetched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home_dir() -> Path:
    """pocketlm's folder for pulled models and caches: $POCKETLM_HOME, else ~/.cache/pocketlm."""
    home = os.environ.get("POCKETLM_HOME")
    return Path(home) if home else Path.home() / ".cache" / "pocketlm"


def models_dir() -> Path:
    """Where pulled and converted models live: $POCKETLM_HOME/models, else ~/.cache/pocketlm/models."""
    return home_dir() / "models"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read 1 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
