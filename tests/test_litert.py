"""Google's on-device files (.litertlm, .task, .tflite): the readers and `pocketlm inspect` on the
samples made with Google's own tools (tests/fixtures/litert, from ../shared/litert/samples), and
damaged copies of them, which must give one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

from pocketlm.errors import ModelFileError
from pocketlm.inspection import describe, render

SAMPLES = Path(__file__).parent / "fixtures" / "litert"
FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".litertlm", ".task", ".tflite"))


@pytest.mark.parametrize("name", FILES)
def test_every_sample_is_described_and_rendered(name):
    d = describe(SAMPLES / name)
    assert d["format"] == name.rsplit(".", 1)[1] and d["size"] == (SAMPLES / name).stat().st_size
    assert json.loads(json.dumps(d)) == d  # --json's content
    text = render(d)
    assert str(SAMPLES / name) in text and "totals per type" in text


def tflite_of(d: dict, model_type: str = "tf_lite_prefill_decode") -> dict:
    return next(s["tflite"] for s in d["sections"] if s["items"].get("model_type") == model_type)


def test_the_tiny_llama_litertlm_shows_its_metadata_tokenizer_signatures_and_int8_weights():
    d = describe(SAMPLES / "tiny_llama_h16_int8.litertlm")
    assert d["version"] == "1.7.0" and d["system_metadata"]["Authors"] == "ODML"
    kinds = [s["data_type"] for s in d["sections"]]
    assert kinds == ["LlmMetadataProto", "ExecutorMetadataProto", "HF_Tokenizer_Zlib", "TFLiteModel"]
    assert all(s["begin"] % 16384 == 0 for s in d["sections"])  # sections start on 16 KiB boundaries
    meta = d["sections"][0]["metadata"]
    assert meta["start_token"] == {"token_str": "<|im_start|>"} and meta["max_num_tokens"] == 256
    assert {"token_ids": {"ids": [2]}} in meta["stop_tokens"] and "jinja_prompt_template" in meta
    executor = d["sections"][1]["metadata"]["llm_executor_metadata"]
    assert len(executor["state_buffers"]) == 4  # K and V of two layers
    assert d["sections"][2]["tokenizer"] == {
        "kind": "Hugging Face tokenizer.json",
        "model": "BPE",
        "vocab_size": 49152,
        "added_tokens": 17,
    }
    model = tflite_of(d)
    assert [(s["key"], s["subgraph"], s["kv_cache_inputs"]) for s in model["signatures"]] == [
        ("prefill_32", 0, 4),
        ("decode", 1, 4),
    ]
    assert len(model["subgraphs"]) == 10 and model["external_buffers"] == 1
    embedding = [t for t in model["tensors"] if t["shape"] == [49152, 16]]
    assert embedding == [
        {
            "name": "arith.constant11",
            "type": "INT8",
            "shape": [49152, 16],
            "quantization": "per-channel (axis 0)",
            "bytes": 786432,
        }
    ]
    projections = [t for t in model["tensors"] if "Linear_q_proj" in t["name"] and t["type"] == "INT8"]
    assert len(projections) == 2 and all(t["shape"] == [16, 16] for t in projections)  # two layers


def test_tflite_quantization_schemes_are_named_with_their_axis_or_block():
    def weights(name):
        return [
            (t["type"], t["shape"], t["quantization"]) for t in describe(SAMPLES / name)["tflite"]["tensors"]
        ]

    assert ("FLOAT32", [128, 64], "none") in weights("tiny_mlp_fp32.tflite")
    for name in ("tiny_mlp_int8_channelwise.tflite", "tiny_mlp_int8_weightonly.tflite"):
        assert ("INT8", [128, 64], "per-channel (axis 0)") in weights(name)
    int4 = [w for w in weights("tiny_mlp_int4_block32.tflite") if w[0] == "INT4"]
    assert sorted(int4) == [("INT4", [32, 128], "blockwise (32)"), ("INT4", [128, 64], "blockwise (32)")]
    totals = describe(SAMPLES / "tiny_mlp_int4_block32.tflite")["tflite"]["totals"]
    assert totals["INT4"] == {"tensors": 2, "bytes": (32 * 128 + 128 * 64) // 2}


def test_the_task_bundle_and_the_builder_files_decode_their_parameters_and_tokenizers():
    d = describe(SAMPLES / "tiny_mlp_int8.task")
    entries = {e["name"]: e for e in d["entries"]}
    assert list(entries) == ["TF_LITE_PREFILL_DECODE", "TOKENIZER_MODEL", "METADATA"]
    assert all(e["begin"] % 4 == 0 for e in d["entries"])  # stored and aligned, so mappable
    assert entries["METADATA"]["metadata"] == {
        "stop_tokens": ["</s>", "<end_of_turn>"],
        "start_token": "<s>",
        "prompt_template": {
            "prompt_prefix": "<start_of_turn>user\n",
            "prompt_suffix": "<end_of_turn>\n<start_of_turn>model\n",
        },
    }
    assert entries["TOKENIZER_MODEL"]["tokenizer"] == {"kind": "SentencePiece", "vocab_size": 64}
    assert [s["key"] for s in entries["TF_LITE_PREFILL_DECODE"]["tflite"]["signatures"]] == [
        "serving_default"
    ]

    sp = describe(SAMPLES / "tiny_mlp_int8.litertlm")
    assert sp["system_metadata"]["sample_int"] == 7
    assert sp["sections"][1]["tokenizer"] == {"kind": "SentencePiece", "vocab_size": 64}
    assert tflite_of(sp)["tensors"] and sp["sections"][2]["items"]["model_version"] == "1.0.1"
    two = describe(SAMPLES / "tiny_mlp_hftok_2models.litertlm")
    assert [s["items"].get("model_type") for s in two["sections"][2:]] == [
        "tf_lite_embedder",
        "tf_lite_prefill_decode",
    ]


def test_inspect_prints_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "inspect", str(SAMPLES / "tiny_llama_h16_int8.litertlm"))
    assert code == 0
    assert "(.litertlm v1.7.0, 2.8 MB, 4 sections)" in out and "section 2: HF_Tokenizer_Zlib" in out
    assert "signature 'prefill_32': subgraph 0, 7 inputs" in out and "4 KV-cache inputs" in out
    assert "tokenizer: Hugging Face tokenizer.json, BPE, 49152 tokens + 17 added" in out
    code, out, _ = run_cli(capsys, "inspect", str(SAMPLES / "tiny_mlp_int8.task"), "--json")
    assert code == 0 and json.loads(out)["entries"][2]["metadata"]["start_token"] == "<s>"


def mutations(data: bytes, rng: random.Random, n: int):
    """Truncations anywhere, and byte flips, extreme u32s and zeroed runs in the first 4 kB (the
    headers, tables and offsets) and in the last bytes."""
    for _ in range(n):
        raw = bytearray(data)
        mutation = rng.choice(("truncate", "flip", "flip", "u32", "zero"))
        head = min(len(raw), 4096)
        if mutation == "truncate":
            yield mutation, bytes(raw[: rng.randrange(len(raw))])
            continue
        at = rng.randrange(head) if rng.random() < 0.8 else rng.randrange(len(raw))
        if mutation == "flip":
            raw[at] ^= 1 << rng.randrange(8)
        elif mutation == "u32":
            raw[at : at + 4] = rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, len(raw))).to_bytes(4, "little")
        else:
            raw[at : at + 64] = bytes(len(raw[at : at + 64]))
        yield mutation, bytes(raw[: len(data)])


@pytest.mark.parametrize("name", FILES)
def test_damaged_copies_give_one_line_errors_never_a_traceback(name, tmp_path):
    data = (SAMPLES / name).read_bytes()
    rng = random.Random(name)
    path = tmp_path / name
    outcomes = {"read": 0, "refused": 0}
    for mutation, mutated in mutations(data, rng, 150):
        path.write_bytes(mutated)
        try:
            describe(path)
            outcomes["read"] += 1
        except ModelFileError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(str(path)), (mutation, message)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0  # damage is noticed (not everything reads as fine)


def test_a_truncated_file_is_one_line_on_the_command_line(capsys, tmp_path):
    bad = tmp_path / "cut.litertlm"
    bad.write_bytes((SAMPLES / "tiny_llama_h16_int8.litertlm").read_bytes()[:100_000])
    code, _, err = run_cli(capsys, "inspect", str(bad))
    assert code == 2 and err.count("\n") == 1
    assert "section 2 spans bytes 49152..692919, outside the file's data" in err


def test_diff_of_a_file_with_itself_is_empty(capsys):
    from pocketlm.diff import diff, is_empty

    for name in FILES:
        assert is_empty(diff(SAMPLES / name, SAMPLES / name)), name
    code, out, _ = run_cli(
        capsys, "diff", str(SAMPLES / "tiny_mlp_int8.task"), str(SAMPLES / "tiny_mlp_int8.task")
    )
    assert code == 0 and out.rstrip().endswith("no differences")


def test_diff_of_differently_quantized_files_lists_the_requantized_weights_and_their_error(capsys):
    from pocketlm.diff import diff

    d = diff(SAMPLES / "tiny_mlp_fp32.tflite", SAMPLES / "tiny_mlp_int8_channelwise.tflite")
    t = d["tensors"]
    assert t["identical"] == 2 and not t["only_a"] and not t["only_b"]  # the biases stay float
    assert sorted(c["a"].rsplit(".", 1)[1] for c in t["changed"]) == ["Linear_fc1;", "Linear_fc2;1"]
    for c in t["changed"]:
        assert c["type"] == ["FLOAT32", "INT8"] and c["quantization"] == ["none", "per-channel (axis 0)"]
        assert c["matched_by"] == "name" and 0 < c["rel_rms"] < 0.005 and c["cosine"] > 0.9999

    d = diff(SAMPLES / "tiny_mlp_int8_channelwise.tflite", SAMPLES / "tiny_mlp_int4_block32.tflite")
    t = d["tensors"]
    assert [c["type"] for c in t["changed"]] == [["INT8", "INT4"]] * 2
    assert all(c["quantization"] == ["per-channel (axis 0)", "blockwise (32)"] for c in t["changed"])
    assert all(0.03 < c["rel_rms"] < 0.1 for c in t["changed"])  # 4-bit blocks of 32 against 8-bit rows
    assert sorted(n.rsplit("_", 1)[1] for n in t["only_b"]) == ["scales", "scales"]  # the blocks' scales

    code, out, _ = run_cli(
        capsys,
        "diff",
        str(SAMPLES / "tiny_mlp_fp32.tflite"),
        str(SAMPLES / "tiny_mlp_int8_channelwise.tflite"),
        "--exit-code",
    )
    assert code == 1 and "type FLOAT32 -> INT8; quantization none -> per-channel (axis 0)" in out


def test_diff_across_formats_matches_tensors_by_shape_where_names_differ(tmp_path, capsys):
    from pocketlm.diff import diff
    from pocketlm.formats.gguf import GGUFWriter
    from pocketlm.formats.quants import GGMLType
    from pocketlm.formats.tflite import open_tflite

    model = open_tflite(SAMPLES / "tiny_mlp_fp32.tflite")
    writer = GGUFWriter()
    writer.add("general.architecture", "mlp")
    for i, t in enumerate(model.weights()):
        writer.add_tensor(f"w{i}", GGMLType.F32, t.shape, lambda t=t: np.asarray(t.data))
    writer.write(tmp_path / "same.gguf")
    d = diff(SAMPLES / "tiny_mlp_fp32.tflite", tmp_path / "same.gguf")
    t = d["tensors"]
    assert t["matched_by_shape"] == 4 and not t["only_a"] and not t["only_b"]
    assert t["identical"] == 4 and not t["changed"]  # the same float32 bytes under other names
    assert d["parts"]["only_a"] == ["TFLite model"] and "general.architecture" in d["metadata"]["only_b"]

    same = diff(SAMPLES / "tiny_mlp_int8.litertlm", SAMPLES / "tiny_mlp_int8_channelwise.tflite")
    assert same["tensors"]["identical"] == 4 and "SP_Tokenizer" in same["parts"]["only_a"]
    code, out, _ = run_cli(
        capsys, "diff", str(SAMPLES / "tiny_mlp_int8.litertlm"), str(SAMPLES / "tiny_mlp_int8.task"), "--json"
    )
    assert code == 0 and json.loads(out)["metadata"]["only_b"]["METADATA.start_token"] == "<s>"


def test_a_tflite_model_over_2_gb_reads_its_buffers_stored_after_the_flatbuffer(tmp_path):
    """The tiny Llama's embedding moved to 3 GiB into a sparse file, its Buffer.offset patched."""
    import struct

    from pocketlm.formats.flatbuf import FlatBuffer
    from pocketlm.formats.litertlm import open_litertlm
    from pocketlm.formats.tflite import open_tflite

    section = open_litertlm(SAMPLES / "tiny_llama_h16_int8.litertlm").sections[3]
    model = bytearray(section.data)
    buffers = FlatBuffer(model, SAMPLES, "test").root(b"TFL3").tables(4, "buffers")
    (external,) = [b for b in buffers if b.scalar(1, "u64") > 1]
    offset, size = external.scalar(1, "u64"), external.scalar(2, "u64")
    far = 3 << 30
    struct.pack_into("<Q", model, external._field(1, 8), far)
    path = tmp_path / "big.tflite"
    with open(path, "wb") as f:
        f.write(model)
        f.seek(far)
        f.write(model[offset : offset + size])
    assert path.stat().st_size > 3 << 30
    big = open_tflite(path)
    (embedding,) = [t for t in big.weights() if t.shape == (49152, 16)]
    assert bytes(embedding.data) == bytes(section.data[offset : offset + size])
    assert big.external_buffers == 1 and big.size == far + size


def test_a_flatbuffer_whose_entries_point_at_one_table_over_and_over_is_refused_at_once(tmp_path):
    """300 subgraph entries naming one subgraph whose 300 tensor entries name one tensor: 90,000
    tensors from 2.5 kB, and from a 1 MB file hours of work, unless the reader counts."""
    import time

    import flatbuffers

    from pocketlm.formats.tflite import open_tflite

    b = flatbuffers.Builder(1024)
    name = b.CreateString("t")
    b.StartObject(4)
    b.PrependUOffsetTRelativeSlot(3, name, 0)
    tensor = b.EndObject()

    def repeated(offset: int, n: int) -> int:
        b.StartVector(4, n, 4)
        for _ in range(n):
            b.PrependUOffsetTRelative(offset)
        return b.EndVector()

    tensors = repeated(tensor, 300)
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, tensors, 0)
    subgraph = b.EndObject()
    subgraphs = repeated(subgraph, 300)
    b.StartObject(8)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    path = tmp_path / "amplified.tflite"
    path.write_bytes(b.Output())
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="more tables than .* bytes can hold"):
        open_tflite(path)
    assert time.perf_counter() - start < 1.0
