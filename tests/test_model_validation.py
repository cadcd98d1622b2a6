"""Model files whose tensors disagree with their hyper-parameters are refused at load, in one line
naming the tensor, before a numba kernel can read past an array (which crashed the process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pocketlm import load
from pocketlm.convert import ConversionConfig, convert
from pocketlm.errors import ModelFileError, PocketLMError
from pocketlm.formats.gguf import GGUFFile, GGUFWriter


@pytest.fixture(scope="module")
def q8_llama(tiny, tmp_path_factory):
    """A tiny Llama with Q8_0 matrices: the decode kernels read them in place."""
    folder = tiny("llama")[1]
    return convert(
        folder, tmp_path_factory.mktemp("q8") / "q8.gguf", ConversionConfig(quant="q8_0"), progress=False
    )


def rewritten(src, dst, shapes=None, metadata=None, drop=(), extra=None):
    """A copy of a GGUF file with some tensors given other shapes (same bytes), other metadata,
    tensors dropped, or `extra` tensors (name -> a tensor of the file to copy) added."""
    f = GGUFFile(src)
    w = GGUFWriter()
    for key, value in {**f.metadata, **(metadata or {})}.items():
        if value is not None:
            w.add(key, value)
    tensors = {name: t for name, t in f.tensors.items() if name not in drop}
    tensors.update({name: f.tensors[source] for name, source in (extra or {}).items()})
    for name, t in tensors.items():
        w.add_tensor(name, t.type, (shapes or {}).get(name, t.shape), lambda t=t: t.data)
    w.write(dst)
    return dst


def test_a_matrix_whose_shape_is_transposed_is_named_at_load(q8_llama, tmp_path):
    """Same bytes, rows and columns swapped: the kernel would read a row twice the input's length."""
    name = "blk.0.ffn_down.weight"
    rows, cols = GGUFFile(q8_llama).tensors[name].shape
    bad = rewritten(q8_llama, tmp_path / "bad.gguf", shapes={name: (cols, rows)})
    with pytest.raises(
        ModelFileError, match=rf"bad.gguf: tensor '{name}' \[{cols}, {rows}\] multiplies vectors of"
    ):
        load(bad)


def test_architecture_features_are_required_by_the_architecture_not_inferred(tiny, tmp_path):
    """A Qwen 3 file that lost its q/k norms used to run as Qwen 2; a Llama file with q/k norms
    ran without them; a StableLM file whose flag says sequential but lacks ffn_norm ran as parallel."""
    qwen3 = tiny("qwen3")[2]
    bad = rewritten(qwen3, tmp_path / "qwen3.gguf", drop=("blk.1.attn_q_norm.weight",))
    with pytest.raises(
        ModelFileError, match=r"qwen3.gguf: model file lacks tensor 'blk.1.attn_q_norm.weight'"
    ):
        load(bad)
    llama = tiny("llama")[2]
    bad = rewritten(
        llama, tmp_path / "llama.gguf", extra={"blk.0.attn_q_norm.weight": "blk.0.attn_norm.weight"}
    )
    with pytest.raises(ModelFileError, match=r"llama.gguf: tensor 'blk.0.attn_q_norm.weight' is not part of"):
        load(bad)
    stablelm = tiny("stablelm")[2]
    assert GGUFFile(stablelm).metadata["pocketlm.parallel_residual"] is False
    bad = rewritten(stablelm, tmp_path / "stablelm.gguf", drop=("blk.2.ffn_norm.weight",))
    with pytest.raises(
        ModelFileError, match=r"stablelm.gguf: model file lacks tensor 'blk.2.ffn_norm.weight'"
    ):
        load(bad)
    # files without our flags (as llama.cpp writes them) keep llama.cpp's rule: the tensors decide
    parallel = tiny("stablelm-parallel")[2]
    unflagged = rewritten(
        parallel,
        tmp_path / "unflagged.gguf",
        metadata={"pocketlm.parallel_residual": None, "pocketlm.attention.qk_norm": None},
    )
    assert load(unflagged).logits([1, 2, 3]).shape[0] == 3


def test_head_counts_that_do_not_fit_the_tensors_are_refused(q8_llama, tmp_path):
    heads = GGUFFile(q8_llama).metadata["llama.attention.head_count"]
    bad = rewritten(q8_llama, tmp_path / "heads.gguf", metadata={"llama.attention.head_count_kv": heads + 1})
    with pytest.raises(ModelFileError, match="heads.gguf: "):
        load(bad)


def test_a_crafted_file_is_one_line_and_exit_2_in_a_real_process(q8_llama, tmp_path):
    """Run in a child: before the checks this file crashed or read neighbouring memory."""
    name = "blk.1.attn_output.weight"
    rows, cols = GGUFFile(q8_llama).tensors[name].shape
    bad = rewritten(q8_llama, tmp_path / "crafted.gguf", shapes={name: (rows // 2, cols * 2)})
    result = subprocess.run(
        [sys.executable, "-m", "pocketlm", "run", str(bad), "Hi", "--max-tokens", "16"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert name in result.stderr and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer.ggml.bos_token_id": 10**6},
        {"tokenizer.ggml.merges": ["no-space-here", "a b c d"]},
        {"tokenizer.ggml.token_type": "not an array"},
        {"tokenizer.ggml.tokens": [1, 2, 3]},
        {"tokenizer.ggml.model": 7},
    ],
)
def test_a_corrupt_tokenizer_in_the_metadata_is_one_line(q8_llama, change):
    from pocketlm.tokenizer import GGUFTokenizer

    f = GGUFFile(q8_llama)
    with pytest.raises(PocketLMError, match="m.gguf: ") as info:
        GGUFTokenizer({**f.metadata, **change}, "m.gguf")
    assert "\n" not in str(info.value)


HOSTILE_VALUES = [0, -1, 2**31, 2**62, 1.5, float("nan"), "abc", True, [1, 2], ["a"]]


def test_every_metadata_key_with_hostile_values_loads_or_fails_in_one_line(q8_llama, tmp_path):
    """Each key of a real file set to each value of the wrong type or range in turn: the model
    loads and renders a chat, or a PocketLMError says why; nothing else (a traceback) escapes."""
    from pocketlm.engine import LoadedModel

    f = GGUFFile(q8_llama)
    escaped = []
    for key in [*f.metadata, "general.alignment"]:
        for value in HOSTILE_VALUES:
            path = rewritten(q8_llama, tmp_path / "m.gguf", metadata={key: value})
            try:
                GGUFFile(path)  # what `inspect` reads
                lm = LoadedModel(path)
                lm.tokenizer.encode_chat([{"role": "user", "content": "hi"}], architecture=lm.architecture)
            except PocketLMError as e:
                assert "\n" not in str(e)
            except Exception as e:
                escaped.append(f"{key}={value!r}: {type(e).__name__}: {e}")
    assert not escaped, "\n".join(escaped)


def test_a_few_hundred_mutated_files_end_in_one_line_errors_or_load_never_a_crash(q8_llama):
    """The CI-sized run of scripts/fuzz_gguf.py (the long runs' figures are in README): byte flips,
    extreme integers over header fields, truncations, NaN/inf over tensor data."""
    from pathlib import Path

    scripts = str(Path(__file__).parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)  # spawned workers get the same sys.path
    import fuzz_gguf

    result = fuzz_gguf.fuzz(q8_llama, cases=300, seed=11)
    bad = {k: result["counts"][k] for k in ("traceback", "crash", "hang")}
    assert bad == {"traceback": 0, "crash": 0, "hang": 0}, result["examples"]
    assert (
        result["counts"]["error"] > 100 and result["counts"]["loaded"] > 10
    )  # the mutations did reach the loader


def test_falcons_parallel_or_sequential_blocks_are_said_by_the_file_not_inferred(tiny, tmp_path):
    """falcon-rw runs its blocks one after the other (a second LayerNorm before the MLP), falcon-7b/40b
    in parallel: our files say which, so a lost norm is refused instead of running the other layout."""
    rw, forty = tiny("falcon-rw")[2], tiny("falcon-40b")[2]
    assert GGUFFile(rw).metadata["pocketlm.parallel_residual"] is False
    assert GGUFFile(forty).metadata["pocketlm.parallel_residual"] is True
    bad = rewritten(rw, tmp_path / "rw.gguf", drop=("blk.1.ffn_norm.weight",))
    with pytest.raises(ModelFileError, match=r"rw.gguf: model file lacks tensor 'blk.1.ffn_norm.weight'"):
        load(bad)
    bad = rewritten(forty, tmp_path / "forty.gguf", extra={"blk.0.ffn_norm.weight": "blk.0.attn_norm.weight"})
    with pytest.raises(
        ModelFileError, match=r"forty.gguf: tensor 'blk.0.ffn_norm.weight' is not part of a parallel"
    ):
        load(bad)
    unflagged = rewritten(rw, tmp_path / "unflagged.gguf", metadata={"pocketlm.parallel_residual": None})
    assert load(unflagged).logits([1, 2, 3]).shape[0] == 3  # llama.cpp-style files: the tensors decide
