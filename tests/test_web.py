"""The web package: its plan replayed exactly as the browser runtime replays it (here through
wgpu-py, then in Chromium's WebGPU), against the native backends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import prompt_ids

from pocketlm import LlmInference, load
from pocketlm.errors import UnsupportedError
from pocketlm.web import create_app, export, runtime_ready
from pocketlm.web.replay import PackageRunner

wgpu = pytest.importorskip("wgpu")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma4", "gemma3n"])
def test_the_exported_plan_replays_to_the_native_logits(tiny, tmp_path, arch):
    model, _, path = tiny(arch)
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["architecture"] == arch and manifest["max_tokens"] == 96
    replay = PackageRunner(package)
    band = replay.passes["prefill"][0]
    ids = prompt_ids(model.config.vocab_size, 2 * band + 8)  # past gemma3's 16-token window
    expected = load(path, kv_cache="f32").logits(ids)  # the package's GPU cache holds float32
    # the prompt in two bands of the prefill pass, then token by token with the decode pass
    assert np.abs(replay.run("prefill", ids[:band], 0) - expected[band - 1]).max() <= 1e-3
    assert np.abs(replay.run("prefill", ids[band : 2 * band], band) - expected[2 * band - 1]).max() <= 1e-3
    ours = np.stack(
        [
            replay.run("decode", [token], position)
            for position, token in enumerate(ids)
            if position >= 2 * band
        ]
    )
    assert np.abs(ours - expected[2 * band :]).max() <= 1e-3


@pytest.mark.parametrize("arch", ["gemma4", "gemma3n"])
def test_the_per_layer_table_is_no_gpu_buffer_but_rows_in_the_package(tiny, tmp_path, arch):
    """The table stays in the package's table files as the GGUF holds it; each pass lists the fill
    of its rows, and no buffer of the plan is near the table's size."""
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.models.gemma3n import PER_LAYER_TABLE

    _, _, path = tiny(arch)
    package = export(path, tmp_path / "web", max_tokens=64, progress=False)
    plan = json.loads((package / "plan.json").read_text())
    table = plan["tables"][PER_LAYER_TABLE]
    w = GGUFFile(path).tensors[PER_LAYER_TABLE]
    stored = b"".join((package / p["file"]).read_bytes() for p in table["pieces"])
    assert stored == np.asarray(w.data).tobytes() and table["rows"] * table["row_bytes"] == w.nbytes
    assert max(b["size"] for b in plan["buffers"]) < w.nbytes // 2  # the f32 table is 4 bytes a value
    for name, n_tokens in (("prefill", 16), ("decode", 1)):
        fills = plan["passes"][name]["fills"]
        assert fills and {f["table"] for f in fills} == {PER_LAYER_TABLE}
        for fill in fills:
            target = next(b for b in plan["buffers"] if b["id"] == fill["buffer"])
            assert target["size"] >= 4 * (fill["at"] + n_tokens * table["cols"])


def test_the_browsers_row_dequantizer_equals_numpys_for_every_type(tmp_path):
    """tables.js (run by Node.js) against pocketlm.formats.quants.dequantize, bit for bit."""
    import shutil
    import subprocess

    from conftest import random_blocks

    from pocketlm.formats.quants import BLOCK_LAYOUT, dequantize

    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    module = Path(__file__).resolve().parent.parent / "browser" / "src" / "tables.js"
    script = (
        f"import {{ dequantize }} from {json.dumps(module.as_uri())};\n"
        "import { readFileSync, writeFileSync } from 'node:fs';\n"
        "const [type, count, src, dst] = process.argv.slice(1);\n"
        "const out = dequantize(Number(type), new Uint8Array(readFileSync(src)), new Float32Array(Number(count)));\n"
        "writeFileSync(dst, new Uint8Array(out.buffer));\n"
    )
    for tensor_type, (block_size, _) in BLOCK_LAYOUT.items():
        blocks = random_blocks(tensor_type, 16, seed=int(tensor_type))
        (tmp_path / "in.bin").write_bytes(blocks.tobytes())
        count = 16 * block_size
        args = [node, "--input-type=module", "-e", script, str(int(tensor_type)), str(count)]
        subprocess.run([*args, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
        ours = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float32)
        expected = dequantize(blocks, tensor_type, (count,))
        assert ours.tobytes() == expected.tobytes(), tensor_type.name


def test_a_long_prompt_is_fed_in_wide_bands_then_narrow_ones_then_singly(tiny, tmp_path):
    """A package of a long enough context also holds a 128-token prefill pass; feeding a prompt uses
    it, then the 16-token one, then single tokens, and ends at the native logits."""
    model, _, path = tiny("llama")
    package = export(path, tmp_path / "web", max_tokens=192, progress=False)
    replay = PackageRunner(package)
    assert replay.passes["prefill_128"][0] == 128 and replay.passes["prefill"][0] == 16
    ids = prompt_ids(model.config.vocab_size, 128 + 16 + 5)
    expected = load(path, kv_cache="f32").logits([*ids, ids[0]])
    assert np.abs(replay.feed(ids, 0) - expected[-2]).max() <= 1e-3
    assert np.abs(replay.run("decode", [ids[0]], len(ids)) - expected[-1]).max() <= 1e-3  # the cache it left


def test_the_package_vocab_forbids_json_the_tokens_that_no_utf8_text_holds(tiny, tmp_path):
    """XGrammar (web-xgrammar 0.1.27) lets a string take byte F6 as a character's lead; the page masks
    every token with a byte no UTF-8 text has (C0, C1, F5-FF) or a raw control character."""
    _, _, path = tiny("llama")
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)
    never = set(json.loads((package / "vocab.json").read_text())["never"])
    table = load(path).tokenizer.token_bytes()
    invalid = {i for i, b in enumerate(table) if any(c >= 0xF5 or c in (0xC0, 0xC1) for c in b)}
    invalid -= {i for i, b in enumerate(table) if b.startswith(b"\xff")}  # control tokens, never text
    assert invalid and invalid <= never
    valid_leads = {i for i, b in enumerate(table) if b in (b"\xf0", b"\xf4", b"\xc3")}
    assert valid_leads and not valid_leads & never


def test_a_second_export_replaces_the_package_and_foreign_folders_are_refused(tiny, tmp_path):
    _, _, path = tiny("llama")
    export(path, tmp_path / "web", max_tokens=64, progress=False)
    export(path, tmp_path / "web", max_tokens=32, progress=False)
    assert json.loads((tmp_path / "web" / "manifest.json").read_text())["max_tokens"] == 32
    (tmp_path / "mine").mkdir()
    from pocketlm.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="not a web package"):
        export(path, tmp_path / "mine", progress=False)


@pytest.fixture(scope="module")
def smol_package(real_model, tmp_path_factory):
    return export(
        real_model("smollm2-135m"), tmp_path_factory.mktemp("web") / "smollm2", max_tokens=256, progress=False
    )


def in_chromium(package: Path, script, screenshot: str):
    """Open the runtime's page on `package` in headless Chromium (SwiftShader WebGPU), wait until
    the model is loaded, and return script(page)."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    if not runtime_ready():
        pytest.skip("the browser runtime is not built (scripts/build_web.sh)")
    from playwright.sync_api import sync_playwright
    from test_server import LiveServer

    server = LiveServer(create_app(package))
    ARTIFACTS.mkdir(exist_ok=True)
    # --enable-unsafe-webgpu alone: more GPU flags make requestAdapter() hang (shared/notes/webgpu.md).
    # Dawn's disable_workgroup_init: SwiftShader zeroes workgroup memory at about 25 MB/s, 0.5 ms for
    # each workgroup of the linear kernel's 12 KB (GPUs do it in nanoseconds); the kernels never read
    # workgroup memory they have not written.
    args = [
        "--no-sandbox",
        "--enable-unsafe-webgpu",
        "--enable-dawn-features=disable_workgroup_init",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=args)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function(
                "['ready', 'error'].includes(document.body.dataset.state)", timeout=240_000
            )
            assert page.evaluate("document.body.dataset.state") == "ready", page.locator(
                "#status"
            ).text_content()
            result = script(page)
            page.screenshot(path=str(ARTIFACTS / screenshot))
            browser.close()
            return result
    finally:
        server.stop()


@pytest.mark.browser
def test_a_seed_samples_the_same_text_in_chromium_as_in_python(tiny, tmp_path):
    """The page's sampler (temperature, top-k, top-p, mulberry32) is pocketlm.sampling's, operation for
    operation: the same seed and options give the same reply (the logits agree to about 1e-5)."""
    _, _, path = tiny("llama")
    cases = [(1.3, 0, 1.0, 5), (0.9, 20, 0.8, 11)]  # temperature, top_k, top_p, seed
    expected = [
        LlmInference(path, backend="webgpu", max_tokens=96, temperature=t, top_k=k, top_p=p, random_seed=seed)
        .create_session()
        .chat("the river", max_new_tokens=24)
        for t, k, p, seed in cases
    ]
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)

    def sampled(page):
        replies = []
        for t, k, p, seed in cases:
            page.evaluate("() => window.pocketlm.reset()")
            options = dict(temperature=t, topK=k, topP=p, seed=seed, maxNewTokens=24)
            replies.append(page.evaluate("(o) => window.pocketlm.generate('the river', o)", options)["text"])
        return replies

    assert in_chromium(package, sampled, "web-tiny-sampled.png") == expected
    assert expected[0] != expected[1]


@pytest.mark.browser
def test_chat_turns_in_chromium_follow_the_native_chat_template(tiny, tmp_path):
    _, _, path = tiny("gemma3")
    native = LlmInference(path, temperature=0.0, max_tokens=96, kv_cache="f32").create_session()
    expected = native.chat("the river and the sea", max_new_tokens=8)
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)

    def two_turns(page):
        first = page.evaluate(
            "() => window.pocketlm.generate('the river and the sea', {temperature: 0, maxNewTokens: 8})"
        )
        second = page.evaluate(
            "() => window.pocketlm.generate('and then?', {temperature: 0, maxNewTokens: 8})"
        )
        return first, second, page.locator(".message.assistant").count()

    first, second, shown = in_chromium(package, two_turns, "web-tiny-chat.png")
    assert first["text"] == expected
    assert len(second["ids"]) == 8 and shown == 2


@pytest.mark.browser
@pytest.mark.parametrize("arch", ["gemma4", "gemma3n"])
def test_a_tiny_edge_gemma_package_in_chromium_writes_the_native_text(tiny, tmp_path, arch):
    """Gemma 4 and Gemma 3n in the browser: per-layer inputs, KV sharing, two head sizes, partial
    RoPE (Gemma 4); AltUp streams, LAuReL, activation sparsity (Gemma 3n)."""
    _, _, path = tiny(arch)
    expected = (
        LlmInference(path, temperature=0.0, max_tokens=96, kv_cache="f32")
        .create_session()
        .chat("the river", max_new_tokens=8)
    )
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)

    def reply(page):
        return page.evaluate("() => window.pocketlm.generate('the river', {temperature: 0, maxNewTokens: 8})")

    assert in_chromium(package, reply, f"web-tiny-{arch}.png")["text"] == expected


@pytest.mark.browser
def test_smollm2_in_chromium_writes_the_native_backends_text(smol_package, real_model):
    prompt, n = "The capital of France is", 12
    native = LlmInference(
        real_model("smollm2-135m"), backend="webgpu", temperature=0.0, max_tokens=256, use_chat_template=False
    )
    session = native.create_session()
    session.add_query_chunk(prompt)
    expected = session.generate_response(max_new_tokens=n)

    def run(page):
        result = page.evaluate(
            "([prompt, n]) => window.pocketlm.generate(prompt, {raw: true, temperature: 0, maxNewTokens: n})",
            [prompt, n],
        )
        return result, page.locator("#status").text_content(), page.locator("#speed").text_content()

    result, status, speed = in_chromium(smol_package, run, "web-smollm2.png")
    print(f"\nbrowser: {status}; {speed}\nbrowser text: {result['text']!r}\nnative text:  {expected!r}")
    assert result["text"] == expected and len(result["ids"]) == n


@pytest.mark.browser
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # byte-level BPE and SentencePiece vocabularies
def test_json_schema_output_in_chromium_validates(tiny, tmp_path, arch):
    """XGrammar's WebAssembly build masks the logits in the page; a random model's valid JSON is the
    grammar's doing. Greedy and sampled, then plain text again in the same conversation."""
    import jsonschema

    _, _, path = tiny(arch, max_position_embeddings=1024)
    package = export(path, tmp_path / "web", max_tokens=1024, progress=False)
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "n": {"type": "integer", "minimum": -5, "maximum": 500},
            "x": {"type": "number"},
            "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}},
            "when": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
            "kind": {"anyOf": [{"const": "x"}, {"type": "null"}]},
        },
        "required": ["name", "n", "x", "tags", "when", "kind"],
        "additionalProperties": False,
    }
    # (web-xgrammar 0.1.27 ignores minimum/maximum on non-integer numbers: 1.5 came out of [0, 1])

    def run(page):
        results = [
            page.evaluate(
                "([s, t]) => window.pocketlm.generate('the river', {temperature: t, seed: 3, "
                "maxNewTokens: 200, jsonSchema: s})",
                [schema, t],
            )
            for t in (0, 1)
        ]
        page.evaluate("() => window.pocketlm.reset()")
        results.append(
            page.evaluate("() => window.pocketlm.generate('the sea', {temperature: 0, maxNewTokens: 6})")
        )
        return results

    greedy, sampled, free = in_chromium(package, run, f"web-json-{arch}.png")
    for result in (greedy, sampled):
        jsonschema.validate(json.loads(result["text"]), schema)
        assert len(result["ids"]) < 200
    assert len(free["ids"]) == 6  # no constraint left behind


@pytest.mark.browser
def test_the_page_streams_a_reply_and_stop_ends_it(tiny, tmp_path):
    _, _, path = tiny("gemma3")
    package = export(path, tmp_path / "web", max_tokens=96, progress=False)

    def type_and_stop(page):
        page.fill("#max-new", "80")
        page.fill("#prompt", "the river <img src=x onerror=alert(1)>")
        page.click("#send")
        reply = page.locator(".message.assistant").last
        page.wait_for_function(
            "document.querySelector('.message.assistant').textContent.length > 0", timeout=60_000
        )
        page.click("#stop")
        page.wait_for_function("document.querySelector('.message.assistant').dataset.state", timeout=60_000)
        return (
            reply.get_attribute("data-state"),
            page.locator(".message.user").text_content(),
            page.locator("#speed").text_content(),
        )

    state, user_text, speed = in_chromium(package, type_and_stop, "web-tiny-stop.png")
    generated = int(speed.split(", ")[1].split()[0])
    assert state == "stopped" and generated < 80
    assert "<img" in user_text  # shown as text, never parsed as HTML


def test_gemma3_270m_web_package_replays_to_the_native_logits(real_model, tmp_path):
    """The second real model's package (its 262144-row embedding split by rows where the binding
    limit needs it): a prompt band of the prefill pass and two decode steps."""
    path = real_model("gemma3-270m")
    package = export(path, tmp_path / "gemma", max_tokens=64, progress=False)
    replay = PackageRunner(package)
    band = replay.passes["prefill"][0]
    native = load(path, kv_cache="f32", prefill="f32")  # as the GPU computes: float32 cache and products
    ids = native.tokenizer.encode("The capital of France is a city that many people visit every year, " * 3)[
        : band + 2
    ]
    assert len(ids) == band + 2
    expected = native.logits(ids)
    assert np.abs(replay.run("prefill", ids[:band], 0) - expected[band - 1]).max() <= 1e-3
    for position in (band, band + 1):
        assert np.abs(replay.run("decode", [ids[position]], position) - expected[position]).max() <= 1e-3


def test_the_pages_top_k_pick_from_the_kernels_output_equals_numpys(tmp_path):
    """runtime.js's topOf (run by Node.js) over topk.wgsl's output for a row with ties at the k-th:
    the k largest logits, the lower ids among equals, in id order, as the Python backend keeps them."""
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    from pocketlm.backends.webgpu import WebGPUBackend

    try:
        gpu = WebGPUBackend()
    except UnsupportedError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, 3001).astype(np.float32)
    k = 17
    logits[rng.integers(0, 3001, 9)] = np.sort(logits)[-k]
    from pocketlm.backends.webgpu.backend import TopK

    top = TopK(gpu.device)
    raw = top.raw(gpu.upload(logits).buf, 0, len(logits), k)
    (tmp_path / "pairs.bin").write_bytes(raw[top.pairs : top.pairs + 2 * int(raw[0])].tobytes())
    module = Path(__file__).resolve().parent.parent / "browser" / "src" / "runtime.js"
    script = (
        f"import {{ topOf }} from {json.dumps(module.as_uri())};\n"
        "import { readFileSync } from 'node:fs';\n"
        "const pairs = new Uint32Array(readFileSync(process.argv[1]).buffer.slice(0));\n"
        f"const {{ ids, logits }} = topOf(pairs, {k});\n"
        "console.log(JSON.stringify({ ids: Array.from(ids), logits: Array.from(logits) }));\n"
    )
    run = subprocess.run(
        [node, "--input-type=module", "-e", script, str(tmp_path / "pairs.bin")],
        check=True,
        capture_output=True,
        text=True,
    )
    found = json.loads(run.stdout)
    expected = np.sort(np.lexsort((np.arange(len(logits)), -logits))[:k])
    assert found["ids"] == expected.tolist()
    assert np.array(found["logits"], np.float32).tobytes() == logits[expected].tobytes()


def test_the_runner_reads_back_the_top_k_of_a_pass_as_the_page_does(tiny, tmp_path):
    """PackageRunner.run_top: the plan's top-k kernels after the decode pass give the k largest of the
    row `run` reads whole (k = 1: its argmax), ids in order; k beyond the plan's range: the whole row."""
    model, _, path = tiny("llama")
    replay = PackageRunner(export(path, tmp_path / "web", max_tokens=64, progress=False))
    ids = prompt_ids(model.config.vocab_size, 8)
    for position, token in enumerate(ids):
        row = replay.run("decode", [token], position)
        for k in (1, 9):
            top, values = replay.run_top("decode", [token], position, k)
            expected = np.sort(np.lexsort((np.arange(len(row)), -row))[:k])
            np.testing.assert_array_equal(top, expected)
            np.testing.assert_allclose(values, row[expected], atol=1e-6)
    whole, row = replay.run_top("decode", [ids[0]], 0, model.config.vocab_size)
    assert whole is None and row.shape == (model.config.vocab_size,)


def test_the_runners_greedy_steps_chained_on_the_gpu_are_the_argmax_of_whole_rows(tiny, tmp_path):
    """PackageRunner.greedy_next, as the page decodes greedily: each token is the argmax of the row
    the same steps give when read whole; a step run ahead and then not taken (another prompt fed, then
    the token that step was fed at its position) leaves no trace."""
    model, _, path = tiny("llama")
    replay = PackageRunner(export(path, tmp_path / "web", max_tokens=64, progress=False))
    assert replay.chains
    ids = prompt_ids(model.config.vocab_size, 8)
    replay.feed(ids, 0)
    expected, token = [], ids[-1]
    for position in range(len(ids) - 1, len(ids) + 9):  # the last prompt token fed again, then 9 more
        token = int(np.argmax(replay.run("decode", [token], position)))
        expected.append(token)
    token, got = ids[-1], []
    for position in range(len(ids) - 1, len(ids) + 4):
        token = replay.greedy_next(token, position)
        got.append(token)
    assert got == expected[:5]
    # The step run ahead was fed `token` at len(ids) + 4. Another prompt of the same length, then that
    # token at that position: computed again over the new prompt, not taken from the stale step.
    others = [(i * 7 + 3) % model.config.vocab_size for i in range(len(ids) + 4)]
    replay.feed(others, 0)
    chained = replay.greedy_next(token, len(ids) + 4)
    replay.feed(others, 0)
    assert chained == int(np.argmax(replay.run("decode", [token], len(ids) + 4)))
    replay.feed(ids, 0)  # the first prompt again: the same steps
    token = ids[-1]
    again = [token := replay.greedy_next(token, p) for p in range(len(ids) - 1, len(ids) + 9)]
    assert again == expected
