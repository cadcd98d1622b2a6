"""Hugging Face Hub references -> local model files.

`hf:OWNER/REPO[/PATH/FILE.gguf][:QUANT][@REVISION]` names a model on the Hub (a named file may also be
one of Google's .litertlm / .task / .tflite files, for `inspect` and `diff`). Transfers go through
huggingface_hub, so its cache (HF_HOME, HF_HUB_CACHE), HF_ENDPOINT, HF_TOKEN or the saved login,
HF_HUB_OFFLINE, its progress bars and its resumption of a broken transfer all apply. On top of it
this module decides which file of a repository to take, checks every fresh download against the
Hub's sha256, fetches every part of a split GGUF model, and converts a safetensors checkpoint once
into the model folder (`general.source.*` keys say where it came from).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidOptionError, ModelFileError
from .formats.gguf import SPLIT_NAME
from .paths import file_sha256, models_dir

PREFIX = "hf:"
_REF = re.compile(
    r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^:@]+\.(?:gguf|litertlm|task|tflite)))?(?::(?P<quant>[A-Za-z0-9_]+))?"
    r"(?:@(?P<revision>[\w./-]+))?$"
)
# which GGUF of a repository to take when the reference names no quantization: the file types
# our kernels run fastest first, then the rest we run, larger ones last
QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "F16", "BF16", "F32",
)  # fmt: skip
_QUANT_LABEL = re.compile(r"^(?:I?Q\d(?:_[A-Z0-9]+)*|F16|BF16|F32)$")
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_SUFFIXES = (
    ".gguf",
    ".litertlm",
    ".task",
    ".tflite",
)  # files a reference may name (Google's: for inspect, diff)
DEFAULT_CONVERSION = "q8_0"  # a safetensors checkpoint converted on pull, unless :QUANT says otherwise


@dataclass(frozen=True)
class HubRef:
    repo: str
    filename: str | None = None
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return (
            PREFIX
            + self.repo
            + (f"/{self.filename}" if self.filename else "")
            + (f":{self.quant}" if self.quant else "")
            + (f"@{self.revision}" if self.revision else "")
        )


def is_hub_ref(model: object) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def parse(text: str) -> HubRef:
    m = _REF.match(text)
    parts = [*(m["file"] or "x").split("/"), *(m["revision"] or "x").split("/")] if m else []
    if not m or not all(part and part != ".." for part in parts):  # nothing that leaves a folder
        raise InvalidOptionError(
            f"{text!r} is not a Hub reference: write hf:OWNER/REPO, hf:OWNER/REPO:QUANT (e.g. :Q4_K_M), "
            "or hf:OWNER/REPO/FILE (.gguf, .litertlm, .task, .tflite), each optionally followed by @REVISION"
        )
    if m["file"] and m["quant"]:
        raise InvalidOptionError(f"{text}: name a file or a quantization, not both")
    return HubRef(m["repo"], m["file"], m["quant"].upper() if m["quant"] else None, m["revision"])


@dataclass
class _Listing:
    """A repository's files at one commit: name -> (size, LFS sha256 or None)."""

    commit: str
    files: dict[str, tuple[int | None, str | None]]
    cached: bool  # read from the local cache (offline, or the Hub unreachable)


def resolve(ref: HubRef | str, quant: str | None = None, download: bool = True, quiet: bool = False) -> Path:
    """A runnable GGUF file for `ref` (its first part, for a split model): taken from the cache,
    else downloaded, and converted when the repository holds a safetensors checkpoint.
    `quant` applies where the reference names none. With download=False only the cache is used."""
    ref = parse(ref) if isinstance(ref, str) else ref
    return _resolve(ref, _listing(ref, online=download), quant, download, quiet)


def source(ref: HubRef | str, quiet: bool = False) -> Path:
    """What `pocketlm convert` reads for `ref`: the checkpoint's folder where the repository has
    one (unless the reference names a GGUF file or a quantization it has as GGUF), else the GGUF."""
    ref = parse(ref) if isinstance(ref, str) else ref
    listing = _listing(ref, online=True)
    if not ref.filename and _has_checkpoint(listing) and ref.quant not in _gguf_files(ref, listing):
        return _fetch_checkpoint(ref, listing, quiet)
    return _resolve(ref, listing, None, True, quiet)


def _resolve(ref: HubRef, listing: _Listing, quant: str | None, download: bool, quiet: bool) -> Path:
    quant = (ref.quant or quant or "").upper() or None
    if ref.filename:
        names = _gguf_set(ref, listing, ref.filename)
    else:
        ggufs = _gguf_files(ref, listing)
        label = _choose(ref, ggufs, quant, has_checkpoint=_has_checkpoint(listing))
        if label is None:
            return _converted(ref, listing, quant, download, quiet)
        names = ggufs[label]
    return [_fetch(ref, listing, name, quiet) for name in names][0]


# -- which files ----------------------------------------------------------------------------------


def _quant_label(name: str) -> str | None:
    """The quantization a GGUF file's name states (Q4_K_M, Q8_0, F16, ...), if any."""
    stem = Path(name).name.removesuffix(".gguf")
    if split := SPLIT_NAME.match(Path(name).name):
        stem = split["stem"]
    for token in reversed(re.split(r"[-.]", stem.upper())):
        if _QUANT_LABEL.match(token):
            return token
    return None


def _gguf_files(ref: HubRef, listing: _Listing) -> dict[str, list[str]]:
    """The repository's models as GGUF: label -> the file names (all parts of a split model).
    Vision projectors (mmproj) are not language models and are left out."""
    out: dict[str, list[str]] = {}
    for name in sorted(listing.files):
        base = Path(name).name
        if not base.endswith(".gguf") or "mmproj" in base.lower():
            continue
        split = SPLIT_NAME.match(base)
        if split and split["no"] != "00001":
            continue
        label = _quant_label(name) or base.removesuffix(".gguf")
        if label not in out:
            out[label] = _gguf_set(ref, listing, name)
    return out


def _gguf_set(ref: HubRef, listing: _Listing, name: str) -> list[str]:
    """`name`, or every part of the split model whose first part it is."""
    if name not in listing.files:
        have = ", ".join(n for n in listing.files if n.endswith(MODEL_SUFFIXES)) or "none"
        raise ModelFileError(f"{ref}: no file {name} in the repository (model files there: {have})")
    split = SPLIT_NAME.match(Path(name).name)
    if not split:
        return [name]
    count = int(split["count"])
    if not 1 <= int(split["no"]) <= count:
        raise ModelFileError(f"{ref}: {name} is not a valid part name (part {int(split['no'])} of {count})")
    if split["no"] != "00001":
        raise ModelFileError(f"{ref}: {name} is one part of a split model; name its first part (-00001-of-)")
    folder = name[: len(name) - len(Path(name).name)]
    names = [f"{folder}{split['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    missing = [n for n in names if n not in listing.files]
    if missing:
        raise ModelFileError(f"{ref}: the split model {name} lacks {', '.join(missing)} in the repository")
    return names


def _has_checkpoint(listing: _Listing) -> bool:
    """config.json and safetensors weights at the repository's top level (where the converter reads them)."""
    top = [n for n in listing.files if "/" not in n]
    return "config.json" in top and any(n.endswith(".safetensors") for n in top)


def _choose(ref: HubRef, ggufs: dict[str, list[str]], quant: str | None, has_checkpoint: bool) -> str | None:
    """The label of the GGUF to take, or None to convert the checkpoint."""
    from .convert.policy import QUANT_CHOICES

    if quant:
        if quant in ggufs:
            return quant
        if has_checkpoint and quant.lower() in QUANT_CHOICES:
            return None
        offer = ", ".join(ggufs) or "no GGUF files"
        also = (
            f"; its checkpoint converts to {', '.join(q.upper() for q in QUANT_CHOICES)}"
            if has_checkpoint
            else ""
        )
        raise ModelFileError(f"{ref}: no {quant} model in the repository (there: {offer}{also})")
    for label in QUANT_PREFERENCE:
        if label in ggufs:
            return label
    if ggufs:
        return next(iter(ggufs))
    if has_checkpoint:
        return None
    raise ModelFileError(f"{ref}: the repository has neither a GGUF file nor a safetensors checkpoint")


# -- talking to the Hub -----------------------------------------------------------------------------


def _listing(ref: HubRef, online: bool) -> _Listing:
    from huggingface_hub import HfApi, constants

    if online and not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True)
        except Exception as e:
            if not _is_network_error(e):
                raise _hub_error(ref, e) from None
            return _cached_listing(ref, f"the Hub at {constants.ENDPOINT} cannot be reached ({_short(e)})")
        files = {
            s.rfilename: (s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or ()
            if _safe_name(s.rfilename)
        }
        if not isinstance(info.sha, str) or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
            raise ModelFileError(f"{ref}: the Hub answered without a commit id")
        return _Listing(info.sha, files, cached=False)
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "only the cache was asked"
    return _cached_listing(ref, why)


def _safe_name(name: object) -> bool:
    """A repository file name that stays inside a folder when joined to it."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in name.split("/")
    )


def _storage(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _cached_listing(ref: HubRef, why: str) -> _Listing:
    """The files of the revision as the local cache has them (the Hub not asked)."""
    storage, revision = _storage(ref.repo), ref.revision or "main"
    commit = revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        pointer = storage / "refs" / revision
        commit = pointer.read_text().strip() if pointer.is_file() else ""
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise ModelFileError(f"{ref}: not in the local Hugging Face cache, and {why}")
    return _Listing(commit, _snapshot_files(snapshot), cached=True)


def _snapshot_files(snapshot: Path) -> dict[str, tuple[int | None, str | None]]:
    return {
        p.relative_to(snapshot).as_posix(): (p.stat().st_size, None)
        for p in sorted(snapshot.rglob("*"))
        if p.is_file()
    }


def _fetch(ref: HubRef, listing: _Listing, name: str, quiet: bool) -> Path:
    """The cached copy of one file of the listing's commit, downloaded if missing; a fresh
    download whose sha256 is not the Hub's is deleted."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    cached = try_to_load_from_cache(ref.repo, name, revision=listing.commit)
    if isinstance(cached, str):
        return Path(cached)
    if listing.cached:  # the listing came from this snapshot, so this cannot happen short of a race
        raise ModelFileError(f"{ref}: {name} is not in the local cache")
    size, sha256 = listing.files[name]
    if not quiet:
        mb = f" ({size / 1e6:.1f} MB)" if size else ""
        print(f"pocketlm: downloading {ref.repo}/{name}{mb} from the Hugging Face Hub", file=sys.stderr)
    were_disabled = are_progress_bars_disabled()
    try:
        if quiet:
            disable_progress_bars()
        # at the listing's commit: a branch that moves meanwhile cannot mix files of two commits
        path = Path(hf_hub_download(ref.repo, name, revision=listing.commit))
    except Exception as e:
        raise _hub_error(ref, e, name) from None
    finally:
        if quiet and not were_disabled:
            enable_progress_bars()
    _record_revision(ref, listing.commit)
    if sha256 and file_sha256(path) != sha256:
        evict(path)
        raise ModelFileError(
            f"{ref}: {name} arrived with another sha256 than the Hub lists ({sha256[:12]}...); "
            "the download was deleted, try again"
        )
    return path


def _record_revision(ref: HubRef, commit: str) -> None:
    """refs/REVISION -> commit in the cache (the cache's layout), so that offline use finds the
    snapshot that the branch or tag named when it was downloaded."""
    revision = ref.revision or "main"
    if revision == commit:
        return
    pointer = _storage(ref.repo) / "refs" / revision
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if not pointer.is_file() or pointer.read_text().strip() != commit:
        pointer.write_text(commit)


def evict(path: Path) -> None:
    """Remove a file from the Hub cache: the snapshot's link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _is_network_error(e: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return True
    if isinstance(e, HfHubHTTPError):
        return e.response is not None and e.response.status_code in (502, 503, 504)
    # httpx / httpx2's TransportError family (connect, read, protocol, proxy, timeouts), requests' and the OS's
    families = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "TimeoutError"}
    return any(c.__name__ in families for c in type(e).__mro__)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _hub_error(ref: HubRef, e: Exception, name: str | None = None) -> ModelFileError:
    """One line for what the Hub (or huggingface_hub) refused."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{ref.repo}"
    if isinstance(e, GatedRepoError):
        return ModelFileError(
            f"{ref}: the repository is gated: accept its licence at {page} with your account, then log in "
            "here (`hf auth login`) or set HF_TOKEN"
        )
    if isinstance(e, RepositoryNotFoundError):
        return ModelFileError(
            f"{ref}: no such repository on the Hub (a private one needs `hf auth login` or HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return ModelFileError(f"{ref}: the repository has no revision {ref.revision!r}")
    if isinstance(e, EntryNotFoundError):
        return ModelFileError(f"{ref}: the repository has no file {name}")
    if isinstance(e, LocalEntryNotFoundError):
        return ModelFileError(f"{ref}: {name} is not cached and the Hub cannot be reached ({_short(e)})")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return ModelFileError(f"{ref}: the Hub answered HTTP {e.response.status_code} for {name or ref.repo}")
    if isinstance(e, OSError) or _is_network_error(e):
        return ModelFileError(f"{ref}: the download of {name or ref.repo} failed ({_short(e)}); try again")
    return ModelFileError(f"{ref}: {type(e).__name__}: {_short(e)}")


# -- checkpoints converted on pull ---------------------------------------------------------------


def _fetch_checkpoint(ref: HubRef, listing: _Listing, quiet: bool) -> Path:
    """The checkpoint's folder in the cache (config, safetensors, tokenizer files only)."""
    wanted = [
        n for n in listing.files if "/" not in n and any(fnmatch.fnmatch(n, p) for p in CHECKPOINT_FILES)
    ]
    if not _has_checkpoint(listing):
        raise ModelFileError(
            f"{ref}: the repository has no safetensors checkpoint (config.json + *.safetensors)"
        )
    index = "model.safetensors.index.json"
    if index in wanted:  # a sharded checkpoint: the shards the index names, not other weights beside them
        shards = set(_read_index(_fetch(ref, listing, index, quiet), ref))
        wanted = [n for n in wanted if not n.endswith(".safetensors") or n in shards]
    paths = [_fetch(ref, listing, name, quiet) for name in wanted]
    return paths[0].parent


def _read_index(path: Path, ref: HubRef) -> list[str]:
    import json

    try:
        weight_map = json.loads(path.read_text()).get("weight_map")
        shards = sorted(set(weight_map.values()))
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise ModelFileError(f"{ref}: model.safetensors.index.json has no weight_map of file names") from None
    if not all(isinstance(n, str) and _safe_name(n) and "/" not in n for n in shards):
        raise ModelFileError(
            f"{ref}: model.safetensors.index.json names shards outside the repository's top level"
        )
    return shards


def converted_path(repo: str, quant: str) -> Path:
    return models_dir() / f"{repo.replace('/', '--')}-{quant.upper()}.gguf"


def _converted(ref: HubRef, listing: _Listing, quant: str | None, download: bool, quiet: bool) -> Path:
    """The checkpoint converted to GGUF in the model folder; converted (again) when missing or
    made from another commit."""
    from .convert import ConversionConfig, convert
    from .formats.gguf import GGUFFile

    quant = (quant or DEFAULT_CONVERSION).lower()
    target = converted_path(ref.repo, quant)
    if target.is_file():
        try:
            made_from = GGUFFile(target).metadata.get("general.source.revision")
        except ModelFileError:
            made_from = None
        if made_from == listing.commit:
            return target
    if not download:
        raise ModelFileError(f"{ref}: no {quant.upper()} conversion of it is in {models_dir()}")
    folder = _fetch_checkpoint(ref, listing, quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pocketlm: converting {ref.repo} to {quant.upper()} (once; kept as {target})", file=sys.stderr)
    source = {
        "general.source.huggingface.repository": ref.repo,
        "general.source.revision": listing.commit,
    }
    return convert(folder, target, ConversionConfig(quant=quant), progress=not quiet, metadata=source)


# -- what is cached: list and remove -----------------------------------------------------------------


def cached_models() -> list[tuple[str, Path]]:
    """The GGUF models in the Hugging Face cache as (the reference that runs it, its file; the first
    part of a split model)."""
    from huggingface_hub import constants

    out = []
    for storage in sorted(Path(constants.HF_HUB_CACHE).glob("models--*")):
        repo = storage.name.removeprefix("models--").replace("--", "/", 1)
        for snapshot in sorted((storage / "snapshots").glob("*")):
            for path in sorted(snapshot.rglob("*.gguf")):
                split = SPLIT_NAME.match(path.name)
                if "mmproj" in path.name.lower() or (split and split["no"] != "00001") or not path.exists():
                    continue
                out.append((f"{PREFIX}{repo}/{path.relative_to(snapshot).as_posix()}", path))
    return out


def origin(path: str | os.PathLike) -> str | None:
    """Where a file of the Hugging Face cache came from ("Hugging Face: OWNER/REPO@COMMIT"), else None."""
    from huggingface_hub import constants

    try:
        parts = Path(path).absolute().relative_to(Path(constants.HF_HUB_CACHE).absolute()).parts
    except ValueError:
        return None
    if len(parts) < 4 or not parts[0].startswith("models--") or parts[1] != "snapshots":
        return None
    return f"Hugging Face: {parts[0].removeprefix('models--').replace('--', '/', 1)}@{parts[2][:7]}"


def remove(ref: HubRef | str) -> list[tuple[Path, int]]:
    """Delete what the cache and the model folder hold of `ref` (every revision): one file, the
    files of one quantization, or the whole repository; returns what was deleted and its size."""
    import shutil

    ref = parse(ref) if isinstance(ref, str) else ref
    storage = _storage(ref.repo)
    removed: list[tuple[Path, int]] = []
    from .convert.policy import QUANT_CHOICES

    converted = [p for q in QUANT_CHOICES if (p := converted_path(ref.repo, q)).is_file()]
    if ref.filename is None and ref.quant is None:
        if storage.is_dir():
            size = sum(p.stat().st_size for p in (storage / "blobs").glob("*") if p.is_file())
            shutil.rmtree(storage)
            removed.append((storage, size))
    else:
        for snapshot in sorted((storage / "snapshots").glob("*")) if storage.is_dir() else []:
            listing = _Listing(snapshot.name, _snapshot_files(snapshot), cached=True)
            if ref.filename:
                names = _gguf_set(ref, listing, ref.filename) if ref.filename in listing.files else []
            else:
                names = _gguf_files(ref, listing).get(ref.quant, [])
            for name in names:
                path = snapshot / name
                size = path.stat().st_size if path.exists() else 0
                evict(path)
                removed.append((path, size))
        converted = [p for p in converted if ref.quant and p == converted_path(ref.repo, ref.quant)]
    for path in converted:
        removed.append((path, path.stat().st_size))
        path.unlink()
    if not removed:
        raise ModelFileError(f"{ref}: nothing of it is in the local cache (see `pocketlm list`)")
    return removed
