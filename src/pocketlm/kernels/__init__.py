"""Hot loops in numba, compiled once per machine and kept on disk (numba's `cache=True`).

numba's cache checks only each function's own source file, not the modules it calls into (the
IR of `intdot`, the intrinsics of `memory`), nor which instruction-set path `isa.selected()`
chose. So the cache lives in a folder named after both: the path, and a hash of this package's
sources and numba's version (under $NUMBA_CACHE_DIR if set, else $POCKETLM_HOME/numba). An edit
or another path compiles afresh; an old folder can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba.core import config

from ..paths import home_dir
from . import isa


def _cache_dir(path: str) -> Path:
    digest = hashlib.sha256(numba.__version__.encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    base = Path(os.environ["NUMBA_CACHE_DIR"]) if os.environ.get("NUMBA_CACHE_DIR") else home_dir() / "numba"
    return base / f"{path}-{digest.hexdigest()[:16]}"


config.CACHE_DIR = str(_cache_dir(isa.PATH))
