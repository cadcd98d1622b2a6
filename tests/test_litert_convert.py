"""Google's LLM files -> GGUF (convert/litert.py): the tiny Llama that litert-torch exported and
LiteRT-LM runs (tests/fixtures/litert), as a .litertlm and as a .task bundle."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli
from test_litert import mutations

from pocketlm.api import LlmInference, load
from pocketlm.convert import ConversionConfig, convert
from pocketlm.convert.litert import _exact_blocks, _permutation, open_bundle, read_decoder
from pocketlm.convert.tokenizer import tokenizer_metadata
from pocketlm.errors import PocketLMError
from pocketlm.formats.gguf import GGUFFile
from pocketlm.formats.quants import dequantize
from pocketlm.formats.tflite import open_tflite
from pocketlm.tokenizer import GGUFTokenizer

SAMPLES = Path(__file__).parent / "fixtures" / "litert"
LITERTLM = SAMPLES / "tiny_llama_h16_int8.litertlm"
TASK = SAMPLES / "tiny_llama_h16_int8.task"
PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time"]
# the Hugging Face module each GGUF role comes from, as litert-torch names it
HF_MODULE = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return convert(LITERTLM, tmp_path_factory.mktemp("litert") / "tiny.gguf", progress=False)


def test_the_tiny_llama_becomes_a_llama_gguf_with_the_files_tokenizer_start_and_stop_tokens(tiny_gguf):
    f = GGUFFile(tiny_gguf)
    m = f.metadata
    assert f.architecture == "llama"
    expected = {
        "llama.block_count": 2,
        "llama.embedding_length": 16,
        "llama.feed_forward_length": 32,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.attention.key_length": 8,
        "llama.rope.freq_base": 10000.0,
        "llama.context_length": 256,  # the file's max_num_tokens and KV cache
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": 1,  # LlmMetadata's start token <|im_start|>, put before every prompt
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.eos_token_id": 2,  # its one-token stop token
        "general.source.file": LITERTLM.name,
    }
    assert {k: m[k] for k in expected} == expected
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)  # from the norm's decomposition
    assert m["tokenizer.chat_template"].startswith(
        "{% for message in messages %}"
    )  # the file's Jinja template
    assert len(m["tokenizer.ggml.tokens"]) == 49152
    # the tokenizer.json stored in the file and the GGUF vocabulary split text alike
    from tokenizers import Tokenizer

    bundle = open_bundle(LITERTLM)
    reference = Tokenizer.from_str(json.dumps(bundle.tokenizer_json))
    ours = GGUFTokenizer(m)
    text = "The sea at dawn, 1234 fishermen: naïve café — 日本語 🤖\n\n  def f(x): return x**2"
    assert ours.encode(text, add_bos=False) == reference.encode(text, add_special_tokens=False).ids


def test_roles_come_from_the_graph_and_agree_with_every_unmerged_tensor_name():
    """litert-torch merges the names of tensors that share a buffer ('up_proj;;...gate_proj' on the
    up projection), so names cannot be trusted; where a tensor of any subgraph carries one
    unmerged name, it must name the layer and module the graph walk found."""
    bundle = open_bundle(LITERTLM)
    decoder = read_decoder(bundle.model)
    names: dict[int, set[str]] = {}
    for graph in bundle.model.subgraphs:
        for t in graph.tensors:
            if t.nbytes and ";;" not in t.name:
                names.setdefault(t.buffer, set()).add(t.name)
    checked = 0
    for i, layer in enumerate(decoder.layers):
        for role, module in HF_MODULE.items():
            t = layer.weights[role]
            for name in names.get(t.buffer, ()):
                match = re.search(r"DecoderLayer_(\d+)/.*Linear_(\w+);?$", name)
                if match:
                    assert (int(match.group(1)), match.group(2)) == (i, module), (role, name)
                    checked += 1
    assert checked >= 10  # most of the 14 matrices carry an unmerged name somewhere
    assert decoder.output is None  # the output projection is the embedding's buffer (tied)


def test_converted_weights_equal_the_tflite_weights_with_llamas_q_k_rows_interleaved(tiny_gguf):
    bundle = open_bundle(LITERTLM)
    decoder = read_decoder(bundle.model)
    f = GGUFFile(tiny_gguf)

    def tflite(t, rows=None):
        x = bundle.model.dequantize(t)
        return x[rows] if rows is not None else x

    pairs = [
        ("token_embd.weight", tflite(decoder.embedding)),
        ("output_norm.weight", tflite(decoder.output_norm)),
    ]
    for i, layer in enumerate(decoder.layers):
        for role, t in layer.weights.items():
            rows = None
            if role in ("attn_q", "attn_k"):
                rows = _permutation(t.shape[0], decoder.n_heads if role == "attn_q" else decoder.n_kv_heads)
            pairs.append((f"blk.{i}.{role}.weight", tflite(t, rows)))
    assert len(pairs) == len(f.tensors) == 20
    for name, expected in pairs:
        ours = f.tensors[name].dequantize().reshape(expected.shape)
        # F16 / Q8_0 (the channel's scale in float16) round to 1 part in 2^11
        assert np.allclose(ours, expected, rtol=2e-3, atol=1e-6), name


@pytest.mark.parametrize(
    "sample, type_name",
    [("tiny_mlp_int8_channelwise.tflite", "Q8_0"), ("tiny_mlp_int4_block32.tflite", "Q4_0")],
)
def test_int8_per_channel_and_int4_block32_weights_are_repacked_without_requantizing(sample, type_name):
    model = open_tflite(SAMPLES / sample)
    weights = [t for t in model.weights() if t.type in ("INT8", "INT4") and len(t.shape) == 2]
    assert weights
    for t in weights:
        rows = np.random.default_rng(0).permutation(t.shape[0])
        for order in (None, rows):
            got = _exact_blocks(model, t, order)
            assert got is not None and got[0].name == type_name
            ours = dequantize(got[1], got[0], t.shape)
            expected = model.dequantize(t)
            expected = expected[order] if order is not None else expected
            if type_name == "Q4_0":  # float16 block scales, 4-bit values: the very same numbers
                assert np.array_equal(ours, expected)
            else:  # the channel's float32 scale stored as float16
                assert np.allclose(ours, expected, rtol=2**-11, atol=0)


def test_the_task_bundle_converts_to_the_same_weights_with_its_sentencepiece_tokenizer(tiny_gguf, tmp_path):
    out = convert(TASK, tmp_path / "task.gguf", progress=False)
    a, b = GGUFFile(tiny_gguf), GGUFFile(out)
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(b.tensors[name].data)), name
    assert b.metadata["tokenizer.ggml.model"] == "llama"  # TOKENIZER_MODEL is a SentencePiece model
    assert len(b.metadata["tokenizer.ggml.tokens"]) == 49152  # its pieces, padded to the embedding rows


def test_pocketlm_picks_the_next_token_that_litert_lm_picks_on_the_same_file(tiny_gguf):
    """LiteRT-LM's greedy next token after each prefix of a text (recorded from LiteRT-LM 0.18.1 on
    this file: tests/fixtures/litert/tiny_llama_litert_lm_next_tokens.json) against the argmax of
    pocketlm's logits on the converted file. Where LiteRT-LM returned '' it held the token back as
    the possible start of one of the file's stop sequences; those prefixes are not compared.
    LiteRT-LM rounds activations to int8 per token (XNNPACK's dynamic range quantization), so a
    random model's near ties may go the other way: measured 61 of 62."""
    record = json.loads((SAMPLES / "tiny_llama_litert_lm_next_tokens.json").read_text())
    lm = load(tiny_gguf)
    ids = [lm.tokenizer.bos_id, *record["ids"]]
    logits = lm.logits(ids[: max(t for t, _ in record["next"]) + 1])
    compared = [(t, text) for t, text in record["next"] if text]
    agree = sum(
        lm.tokenizer.decode([int(np.argmax(logits[t]))], skip_special=False) == text for t, text in compared
    )
    assert len(compared) >= 60 and agree >= len(compared) - 1, (agree, len(compared))


@pytest.mark.litertlm
def test_greedy_text_equals_litert_lms_when_it_is_installed(tiny_gguf):
    litert_lm = pytest.importorskip("litert_lm")
    import tempfile

    engine = litert_lm.Engine(
        str(LITERTLM),
        backend=litert_lm.Backend.CPU(thread_count=2),
        max_num_tokens=256,
        cache_dir=tempfile.mkdtemp(),
    )
    llm = LlmInference(tiny_gguf, max_tokens=256, temperature=0.0, use_chat_template=False)
    for prompt in PROMPTS:
        session = engine.create_session(
            apply_prompt_template=False,
            max_output_tokens=32,
            sampler_config=litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0, seed=0),
        )
        session.run_prefill([prompt])
        theirs = session.run_decode().texts[0]
        assert llm.generate_response(prompt)[: len(theirs)] == theirs


@pytest.mark.llamacpp
def test_the_converted_file_loads_and_generates_in_llama_cpp(tiny_gguf):
    pytest.importorskip("llama_cpp")
    from test_convert import llama_cpp_model

    llm = llama_cpp_model(tiny_gguf)
    ids = [1, *range(300, 340)]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = load(tiny_gguf).logits(ids)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99  # float16 weights in llama.cpp's arithmetic
    assert llm.create_completion("The sea", max_tokens=8, temperature=0.0)["choices"][0]["text"] is not None


def test_run_converts_a_google_file_once_and_then_uses_the_conversion(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    argv = ("run", str(LITERTLM), "The sea", "--temperature", "0", "--max-tokens", "24", "--raw")
    code, first, err = run_cli(capsys, *argv)
    assert code == 0 and first.strip() and "converting tiny_llama_h16_int8.litertlm to GGUF once" in err
    converted = list((tmp_path / "models" / "converted").glob("tiny_llama_h16_int8-*.gguf"))
    assert len(converted) == 1
    code, second, err = run_cli(capsys, *argv)
    assert code == 0 and second == first and "converting" not in err


def test_files_that_hold_no_llm_export_say_so_in_one_line(capsys, tmp_path):
    for name in ("tiny_mlp_int8.litertlm", "tiny_mlp_int8.task", "tiny_mlp_fp32.tflite"):
        code, _, err = run_cli(capsys, "convert", str(SAMPLES / name), str(tmp_path / "out.gguf"))
        assert code == 2 and err.count("\n") == 1 and "pocketlm: error:" in err, err
        assert not (tmp_path / "out.gguf").exists()


def test_damaged_copies_convert_or_fail_in_one_line_never_a_traceback(tmp_path):
    data = LITERTLM.read_bytes()
    rng = random.Random(7)
    outcomes = {"converted": 0, "refused": 0}
    for mutation, mutated in mutations(data, rng, 40):
        path = tmp_path / "damaged.litertlm"
        path.write_bytes(mutated)
        try:
            convert(path, tmp_path / "out.gguf", progress=False)
            outcomes["converted"] += 1
        except PocketLMError as e:
            assert "\n" not in str(e), (mutation, str(e))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_a_sentencepiece_bpe_tokenizer_json_becomes_a_llama_vocabulary_that_splits_text_alike():
    """Gemma's checkpoints and .litertlm files carry only tokenizer.json, holding a SentencePiece BPE
    ("▁" for spaces, byte fallback). A tiny one trained here stands in for it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256))]
    corpus = [f"the quick brown fox {i} jumps over the lazy dog near the river bank" for i in range(300)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=specials))
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    tj = json.loads(tok.to_str())

    class Source:  # what convert.tokenizer reads of a checkpoint
        folder, sentencepiece_model, tokenizer_json, chat_template = Path("x"), None, tj, None
        tokenizer_config = {"bos_token": "<bos>", "eos_token": "<eos>"}
        config = {}

    keys = tokenizer_metadata(Source(), tok.get_vocab_size())
    metadata = {k: v for k, (v, _, _) in keys.items()}
    assert metadata["tokenizer.ggml.model"] == "llama"
    ours = GGUFTokenizer(metadata)
    for text in (
        "the quick brown fox jumps",
        "  the   lazy dog ",
        "unseen: é 日本 🦊!",
        "<start_of_turn>the river",
    ):
        assert ours.encode(text, add_bos=False) == tok.encode(text).ids, text
        assert ours.decode(ours.encode(text, add_bos=False), skip_special=False) == text


def test_llm_inference_runs_a_litertlm_file_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    llm = LlmInference(str(LITERTLM), max_tokens=64, temperature=0.0, use_chat_template=False)
    assert isinstance(llm.generate_response("Once upon a time"), str)


def test_the_cli_convert_keeps_int8_unless_asked_to_requantize(tmp_path):
    env = dict(os.environ, POCKETLM_HOME=str(tmp_path))
    kept = tmp_path / "kept.gguf"
    f32 = tmp_path / "f32.gguf"
    for out, extra in ((kept, ()), (f32, ("--quant", "f32"))):
        result = subprocess.run(
            [sys.executable, "-m", "pocketlm", "convert", str(LITERTLM), str(out), "--quiet", *extra],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    assert GGUFFile(kept).tensors["blk.0.ffn_down.weight"].type.name == "Q8_0"  # 32 inputs: whole blocks
    assert GGUFFile(f32).tensors["blk.0.ffn_down.weight"].type.name == "F32"
    assert ConversionConfig().keep_source_bits


def test_either_kv_cache_layout_gives_the_same_heads_and_length():
    """litert-torch's caches are [1, kv heads, positions, head dim]; ai-edge-torch's [1, positions,
    kv heads, head dim]: the key projection's size says which."""
    import dataclasses

    bundle = open_bundle(LITERTLM)
    expected = read_decoder(bundle.model)
    assert (expected.n_kv_heads, expected.cache_length, expected.head_dim) == (1, 256, 8)
    for graph in bundle.model.subgraphs:
        for i, t in enumerate(graph.tensors):
            if re.search(r"kv_cache_[kv]_\d+$", t.name) and len(t.shape) == 4:
                graph.tensors[i] = dataclasses.replace(
                    t, shape=(t.shape[0], t.shape[2], t.shape[1], t.shape[3])
                )
    swapped = read_decoder(bundle.model)
    assert (swapped.n_kv_heads, swapped.cache_length, swapped.head_dim) == (1, 256, 8)


def test_a_graph_whose_reshape_feeds_itself_is_refused_not_looped_over():
    import dataclasses

    from pocketlm.errors import UnsupportedError

    bundle = open_bundle(LITERTLM)
    decode = bundle.model.subgraphs[next(s.subgraph for s in bundle.model.signatures if s.key == "decode")]
    first = next(k for k, op in enumerate(decode.ops) if op.op == "FULLY_CONNECTED")
    source = decode.ops[first].inputs[0]
    maker = next(k for k, op in enumerate(decode.ops) if source in op.outputs)
    # the norm that made the attention input is replaced by a reshape of its own output
    decode.ops[maker] = dataclasses.replace(decode.ops[maker], op="RESHAPE", inputs=(source,), composite=None)
    with pytest.raises(UnsupportedError, match="no norm before layer 0's attention"):
        read_decoder(bundle.model)


def test_a_tokenizer_json_that_is_not_a_tokenizer_is_one_line(tmp_path, monkeypatch):
    from pocketlm.convert import litert

    real = litert.open_bundle

    def damaged(path):
        bundle = real(path)
        bundle.tokenizer_json = {"model": "BPE", "added_tokens": [{"id": "x", "content": 3}]}
        return bundle

    monkeypatch.setattr(litert, "open_bundle", damaged)
    with pytest.raises(PocketLMError) as error:
        convert(LITERTLM, tmp_path / "out.gguf", progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "out.gguf").exists()


def test_int4_per_channel_weights_become_q4_0_blocks_holding_the_same_numbers():
    """An INT4 weight with one scale per output channel: each Q4_0 block carries its row's scale
    (as float16) and the same 4-bit values, the even element of each byte in the low nibble."""
    from pocketlm.formats.tflite import Quantization, TFLiteModel, TFLiteTensor

    rng = np.random.default_rng(0)
    values = rng.integers(-8, 8, (6, 64)).astype(np.int8)
    nibbles = (values.reshape(-1) & 0xF).astype(np.uint8)
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    scales = rng.uniform(0.01, 0.1, 6).astype(np.float32)
    quant = Quantization("per-channel", axis=0, scales=scales, zero_points=np.zeros(6, np.int64))
    t = TFLiteTensor("w", "INT4", (6, 64), 1, quant, packed.size, packed)
    model = TFLiteModel(Path("x"), 3, None, [], [], [], 0, 0)
    assert np.array_equal(model.dequantize(t), values * scales[:, None])  # the reader's own reading
    rows = np.array([3, 1, 0, 2, 5, 4])
    tensor_type, blocks = _exact_blocks(model, t, rows)
    half_scales = scales.astype(np.float16).astype(np.float32)[:, None]
    assert tensor_type.name == "Q4_0"
    assert np.array_equal(dequantize(blocks, tensor_type, t.shape), (values * half_scales)[rows])
