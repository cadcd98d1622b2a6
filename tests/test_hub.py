"""hf: references against a stand-in Hub on loopback (tests/fake_hub.py), as a user meets them: the
`pocketlm` command (or Python) in a fresh process whose HF_ENDPOINT points at it, with its own
Hugging Face cache (HF_HOME) and model folder (POCKETLM_HOME)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_split
from fake_hub import FakeHub, Repo

from pocketlm.errors import InvalidOptionError
from pocketlm.formats.gguf import GGUFFile
from pocketlm.hub import HubRef, parse
from pocketlm.paths import home_dir


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def ggufs(tiny, tmp_path_factory):
    """Two distinct small GGUF files (the tiny llama as F32 and as Q8_0)."""
    from pocketlm.convert import ConversionConfig, convert

    _, folder, f32 = tiny("llama")
    q8 = convert(
        folder, tmp_path_factory.mktemp("q8") / "q8.gguf", ConversionConfig(quant="q8_0"), progress=False
    )
    return f32.read_bytes(), q8.read_bytes()


def user_env(hub: FakeHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        POCKETLM_HOME=str(tmp_path / "pocketlm"),
        NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR")
        or str(home_dir() / "numba"),  # compiled kernels reused
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.update(extra)
    return env


def pocketlm(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", *argv], capture_output=True, text=True, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("pocketlm: error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def cached_blobs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf" / "hub").rglob("blobs/*") if p.is_file()]


def test_references_name_a_repository_a_file_a_quantization_and_a_revision():
    assert parse("hf:acme/tiny-GGUF") == HubRef("acme/tiny-GGUF")
    assert parse("hf:acme/tiny-GGUF:q4_k_m") == HubRef("acme/tiny-GGUF", quant="Q4_K_M")
    assert parse("hf:acme/tiny-GGUF/sub/tiny-Q8_0.gguf@v1.0") == HubRef(
        "acme/tiny-GGUF", "sub/tiny-Q8_0.gguf", None, "v1.0"
    )
    assert str(parse("hf:acme/tiny:Q8_0@main")) == "hf:acme/tiny:Q8_0@main"
    for bad in (
        "hf:acme",
        "hf:acme/tiny/notes.txt",
        "hf:acme/tiny/../x.gguf",
        "hf:acme/tiny/a.gguf:Q8_0",
        "hf:/x",
    ):
        with pytest.raises(InvalidOptionError):
            parse(bad)


def test_pull_takes_q4_k_m_by_default_the_named_quantization_otherwise_and_lists_what_there_is(
    hub, ggufs, tmp_path
):
    f32, q8 = ggufs
    hub.repos["acme/tiny-GGUF"] = Repo(
        {
            "README.md": b"# tiny",
            "tiny-Q8_0.gguf": q8,
            "tiny-Q4_K_M.gguf": f32,
            "tiny-IQ2_XS.gguf": f32,
            "mmproj-tiny-F16.gguf": f32,
        }
    )
    env = user_env(hub, tmp_path)
    result = pocketlm(env, "pull", "hf:acme/tiny-GGUF")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip().endswith("tiny-Q4_K_M.gguf") and Path(result.stdout.strip()).read_bytes() == f32
    )
    assert hub.downloads("tiny-Q8_0.gguf") == [] and hub.downloads("mmproj-tiny-F16.gguf") == []

    for ref, argv in (("hf:acme/tiny-GGUF:q8_0", ()), ("hf:acme/tiny-GGUF", ("--quant", "Q8_0"))):
        result = pocketlm(env, "pull", ref, *argv)
        assert result.returncode == 0 and Path(result.stdout.strip()).read_bytes() == q8, result.stderr
    assert len(hub.downloads("tiny-Q8_0.gguf")) == 1  # the second pull found it in the cache

    error = one_line_error(pocketlm(env, "pull", "hf:acme/tiny-GGUF:Q5_K_M"))
    assert "no Q5_K_M model in the repository (there: IQ2_XS, Q4_K_M, Q8_0)" in error
    assert "no such repository" in one_line_error(pocketlm(env, "pull", "hf:acme/nothing"))
    assert "has no revision 'v9'" in one_line_error(pocketlm(env, "pull", "hf:acme/tiny-GGUF@v9"))
    assert "no file tiny-F16.gguf" in one_line_error(pocketlm(env, "pull", "hf:acme/tiny-GGUF/tiny-F16.gguf"))


def test_google_files_on_the_hub_can_be_inspected_and_diffed(hub, tmp_path):
    samples = Path(__file__).parent / "fixtures" / "litert"
    hub.repos["google/tiny-litert"] = Repo(
        {name: (samples / name).read_bytes() for name in ("tiny_mlp_int8.litertlm", "tiny_mlp_int8.task")}
    )
    env = user_env(hub, tmp_path)
    result = pocketlm(env, "inspect", "hf:google/tiny-litert/tiny_mlp_int8.litertlm")
    assert result.returncode == 0 and "(.litertlm v1.7.0" in result.stdout, result.stderr
    a, b = "hf:google/tiny-litert/tiny_mlp_int8.litertlm", "hf:google/tiny-litert/tiny_mlp_int8.task"
    result = pocketlm(env, "diff", a, b)
    assert result.returncode == 0 and "tensors: 4 identical, 0 differ" in result.stdout, result.stderr


def test_a_gated_repository_says_to_accept_the_licence_and_opens_with_a_granted_token(hub, ggufs, tmp_path):
    hub.repos["acme/gated"] = Repo({"gated-Q8_0.gguf": ggufs[1]}, gated=True)
    for token in ({}, {"HF_TOKEN": "hf_not_granted"}):
        error = one_line_error(pocketlm(user_env(hub, tmp_path, **token), "pull", "hf:acme/gated"))
        assert f"gated: accept its licence at {hub.url}/acme/gated" in error and "HF_TOKEN" in error
    assert cached_blobs(tmp_path) == []
    result = pocketlm(user_env(hub, tmp_path, HF_TOKEN=FakeHub.TOKEN), "pull", "hf:acme/gated")
    assert result.returncode == 0 and Path(result.stdout.strip()).read_bytes() == ggufs[1], result.stderr


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    # huggingface_hub keeps what arrived in whole 10 MB chunks, so the file is larger than two
    data = np.random.default_rng(0).integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()
    hub.repos["acme/big-GGUF"] = Repo({"big-Q8_0.gguf": data}, cut_once={"big-Q8_0.gguf"})
    result = pocketlm(user_env(hub, tmp_path), "pull", "hf:acme/big-GGUF")
    assert result.returncode == 0, result.stderr
    first, resumed = hub.downloads("big-Q8_0.gguf")
    assert first is None and resumed.startswith("bytes=") and 0 < int(resumed[6:-1]) <= len(data) // 2
    assert Path(result.stdout.strip()).read_bytes() == data


def test_a_download_that_does_not_match_its_checksum_is_deleted_and_reported(hub, ggufs, tmp_path):
    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1]}, corrupt={"tiny-Q8_0.gguf"})
    env = user_env(hub, tmp_path)
    error = one_line_error(pocketlm(env, "pull", "hf:acme/tiny-GGUF"))
    assert "arrived with another sha256 than the Hub lists" in error and "deleted" in error
    assert cached_blobs(tmp_path) == [] and not list((tmp_path / "hf").rglob("*.gguf"))
    hub.repos["acme/tiny-GGUF"].corrupt.clear()  # the next try gets the right bytes
    result = pocketlm(env, "pull", "hf:acme/tiny-GGUF")
    assert result.returncode == 0 and Path(result.stdout.strip()).read_bytes() == ggufs[1], result.stderr


def checkpoint_repo(folder: Path) -> Repo:
    return Repo({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def test_a_safetensors_repository_is_converted_once_on_pull_as_the_local_converter_would(hub, tiny, tmp_path):
    from pocketlm.convert import ConversionConfig, convert

    _, folder, _ = tiny("llama")
    hub.repos["acme/tiny"] = checkpoint_repo(folder)
    env = user_env(hub, tmp_path)
    result = pocketlm(env, "pull", "hf:acme/tiny")
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == tmp_path / "pocketlm" / "models" / "acme--tiny-Q8_0.gguf"
    assert "converting acme/tiny to Q8_0" in result.stderr
    pulled = GGUFFile(path)
    assert pulled.metadata["general.source.huggingface.repository"] == "acme/tiny"
    assert pulled.metadata["general.source.revision"] == hub.repos["acme/tiny"].commit
    local = GGUFFile(convert(folder, tmp_path / "local.gguf", ConversionConfig(quant="q8_0"), progress=False))
    assert {n: bytes(t.data) for n, t in pulled.tensors.items()} == {
        n: bytes(t.data) for n, t in local.tensors.items()
    }

    mtime = path.stat().st_mtime_ns
    again = pocketlm(env, "pull", "hf:acme/tiny")
    assert again.returncode == 0 and "converting" not in again.stderr and path.stat().st_mtime_ns == mtime
    assert len(hub.downloads("model.safetensors")) == 1
    q4 = pocketlm(env, "pull", "hf:acme/tiny:q4_0")
    assert q4.returncode == 0 and q4.stdout.strip().endswith("acme--tiny-Q4_0.gguf"), q4.stderr
    error = one_line_error(pocketlm(env, "pull", "hf:acme/tiny:Q4_K_M"))
    assert (
        "no Q4_K_M model in the repository (there: no GGUF files; its checkpoint converts to F32, F16"
        in error
    )

    converted = pocketlm(
        env, "convert", "hf:acme/tiny", str(tmp_path / "mine.gguf"), "--quant", "q4_0", "--quiet"
    )
    assert converted.returncode == 0, converted.stderr  # from the cached checkpoint, with the user's options
    mine, local = GGUFFile(tmp_path / "mine.gguf"), GGUFFile(Path(q4.stdout.strip()))
    assert {n: bytes(t.data) for n, t in mine.tensors.items()} == {
        n: bytes(t.data) for n, t in local.tensors.items()
    }
    assert len(hub.downloads("model.safetensors")) == 1

    hub.repos["acme/tiny"].commit = "f" * 40  # a new commit on the Hub: converted again
    result = pocketlm(env, "pull", "hf:acme/tiny")
    assert (
        "converting acme/tiny" in result.stderr
        and GGUFFile(path).metadata["general.source.revision"] == "f" * 40
    )


def test_offline_mode_runs_from_the_cache_and_says_when_the_model_is_not_there(hub, ggufs, tmp_path):
    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1], "tiny-F32.gguf": ggufs[0]})
    online = pocketlm(user_env(hub, tmp_path), "pull", "hf:acme/tiny-GGUF:Q8_0")
    assert online.returncode == 0, online.stderr
    asked = len(hub.requests)
    offline = user_env(hub, tmp_path, HF_HUB_OFFLINE="1")
    result = pocketlm(offline, "pull", "hf:acme/tiny-GGUF:Q8_0")
    assert result.returncode == 0 and result.stdout == online.stdout, result.stderr
    error = one_line_error(pocketlm(offline, "pull", "hf:acme/tiny-GGUF:F32"))
    assert "no F32 model in the repository (there: Q8_0)" in error  # what the cache has
    error = one_line_error(pocketlm(offline, "pull", "hf:acme/other"))
    assert "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in error
    assert len(hub.requests) == asked  # offline means offline

    hub.close()  # the Hub gone without offline mode: the cache still answers
    result = pocketlm(user_env(hub, tmp_path), "pull", "hf:acme/tiny-GGUF:Q8_0")
    assert result.returncode == 0 and result.stdout == online.stdout, result.stderr


def test_a_split_gguf_repository_is_fetched_whole_and_opens_as_one_model(hub, tiny, tmp_path):
    _, _, whole = tiny("llama")
    parts = write_split(whole, tmp_path, "tiny-Q8_0", 2)
    hub.repos["acme/split-GGUF"] = Repo({p.name: p.read_bytes() for p in parts})
    result = pocketlm(user_env(hub, tmp_path), "pull", "hf:acme/split-GGUF")
    assert result.returncode == 0 and result.stdout.strip().endswith("tiny-Q8_0-00001-of-00002.gguf"), (
        result.stderr
    )
    assert [len(hub.downloads(p.name)) for p in parts] == [1, 1]
    model = GGUFFile(result.stdout.strip())
    assert len(model.parts) == 2 and model.tensors.keys() == GGUFFile(whole).tensors.keys()
    error = one_line_error(pocketlm(user_env(hub, tmp_path), "pull", f"hf:acme/split-GGUF/{parts[1].name}"))
    assert "is one part of a split model; name its first part" in error


def test_list_show_and_rm_cover_hub_models_and_conversions(hub, ggufs, tiny, tmp_path):
    _, folder, _ = tiny("llama")
    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1]})
    hub.repos["acme/tiny"] = checkpoint_repo(folder)
    env = user_env(hub, tmp_path)
    for ref in ("hf:acme/tiny-GGUF", "hf:acme/tiny"):
        assert pocketlm(env, "pull", ref).returncode == 0
    listing = pocketlm(env, "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "Hugging Face: acme/tiny-GGUF@0123456" in rows["hf:acme/tiny-GGUF/tiny-Q8_0.gguf"]
    assert "Hugging Face: acme/tiny@0123456, converted" in rows["acme--tiny-Q8_0"]

    card = pocketlm(env, "show", "hf:acme/tiny-GGUF:Q8_0")
    assert card.returncode == 0 and "from:            Hugging Face: acme/tiny-GGUF@0123456" in card.stdout, (
        card.stderr
    )
    assert "llama" in card.stdout

    removed = pocketlm(env, "rm", "hf:acme/tiny-GGUF", "hf:acme/tiny")
    assert removed.returncode == 0, removed.stderr
    assert [line.split()[1].split("/")[-1] for line in removed.stdout.splitlines()] == [
        "models--acme--tiny-GGUF",  # the cached repository
        "models--acme--tiny",  # the checkpoint it was converted from
        "acme--tiny-Q8_0.gguf",  # the conversion
    ]
    assert pocketlm(env, "list").stdout.strip() == ""
    assert "not in the local Hugging Face cache" in one_line_error(pocketlm(env, "show", "hf:acme/tiny-GGUF"))
    assert "nothing of it is in the local cache" in one_line_error(pocketlm(env, "rm", "hf:acme/tiny"))


def test_the_python_api_takes_a_hub_reference(hub, ggufs, tmp_path):
    from pocketlm import LlmInference

    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1]})
    options = "backend='reference', max_tokens=32, temperature=0.0, use_chat_template=False"
    code = (
        "from pocketlm import LlmInference\n"
        f"llm = LlmInference('hf:acme/tiny-GGUF', {options})\n"
        "print(llm.model.path)\n"
        "print(repr(llm.generate_response('a b', max_new_tokens=4)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=user_env(hub, tmp_path)
    )
    assert result.returncode == 0, result.stderr
    path, reply = result.stdout.splitlines()
    assert Path(path).name == "tiny-Q8_0.gguf" and Path(path).read_bytes() == ggufs[1]
    local = tmp_path / "local.gguf"
    local.write_bytes(ggufs[1])
    llm = LlmInference(local, backend="reference", max_tokens=32, temperature=0.0, use_chat_template=False)
    assert reply == repr(llm.generate_response("a b", max_new_tokens=4))


def test_a_short_name_can_stand_for_a_hub_file(hub, ggufs, tmp_path):
    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1]})
    sha256 = hashlib.sha256(ggufs[1]).hexdigest()
    code = f"""
from pocketlm import registry
from pocketlm.errors import ModelFileError
registry.MODELS["tiny"] = registry.KnownModel(
    "tiny", "tiny-Q8_0.gguf", (), (), "{sha256}", {len(ggufs[1])}, "a test model", hub="hf:acme/tiny-GGUF/tiny-Q8_0.gguf"
)
try:
    registry.resolve_model("tiny")
except ModelFileError as e:
    print(e)
print(registry.resolve_model("tiny", auto_pull=True))
print(registry.resolve_model("tiny"))
print(registry.file_sha256(registry.find_local("tiny")))
print(registry.remove("tiny")[0][0].name)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=user_env(hub, tmp_path)
    )
    assert result.returncode == 0, result.stderr
    error, pulled, found, local_sha256, removed = result.stdout.splitlines()
    assert (
        error
        == "model 'tiny' is not downloaded yet: run `pocketlm pull tiny` (fetches it from the Hugging Face Hub)"
    )
    assert pulled == found and local_sha256 == sha256 and len(hub.downloads("tiny-Q8_0.gguf")) == 1
    assert removed == "tiny-Q8_0.gguf" and not Path(found).exists()


def test_rm_of_a_repository_removes_its_own_conversions_only(tmp_path, monkeypatch):
    from pocketlm import hub

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "_storage", lambda repo: tmp_path / "no-hub-cache")
    models = tmp_path / "models"
    models.mkdir()
    for name in ("acme--tiny-Q8_0.gguf", "acme--tiny-Q4_0.gguf", "acme--tiny-instruct-Q8_0.gguf"):
        (models / name).write_bytes(b"x")
    assert sorted(p.name for p, _ in hub.remove("hf:acme/tiny")) == [
        "acme--tiny-Q4_0.gguf",
        "acme--tiny-Q8_0.gguf",
    ]
    assert [p.name for p in models.iterdir()] == ["acme--tiny-instruct-Q8_0.gguf"]


def test_a_quiet_download_transfers_without_progress_and_bad_part_names_are_one_line_errors(
    hub, ggufs, tmp_path
):
    hub.repos["acme/tiny-GGUF"] = Repo({"tiny-Q8_0.gguf": ggufs[1]})
    hub.repos["acme/bad-split"] = Repo({"x-Q8_0-00001-of-00000.gguf": ggufs[1]})
    env = user_env(hub, tmp_path)
    out = tmp_path / "out.gguf"
    result = pocketlm(env, "convert", "hf:acme/tiny-GGUF", str(out), "--quant", "q8_0", "--quiet")
    assert result.returncode == 0 and out.is_file() and result.stderr == "", result.stderr
    assert len(hub.downloads("tiny-Q8_0.gguf")) == 1
    assert "not a valid part name (part 1 of 0)" in one_line_error(pocketlm(env, "pull", "hf:acme/bad-split"))
