"""GGUF reading and writing: round trips, validation of bad files, atomic writes."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pocketlm.errors import ModelFileError
from pocketlm.formats.gguf import GGUFFile, GGUFWriter, ValueType
from pocketlm.formats.quants import GGMLType, quantize


def write_small(path, extra_tensor_type=GGMLType.Q8_0):
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.add("llama.block_count", 2)
    w.add("llama.rope.freq_base", 10000.0)
    w.add("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add("tokenizer.ggml.scores", np.array([0.0, -1.0, -2.0], np.float32))
    w.add("flag", True)
    w.add("negative", -5)
    x = np.arange(64 * 3, dtype=np.float32).reshape(3, 64) / 10
    w.add_tensor("vec", GGMLType.F32, (5,), lambda: quantize(np.arange(5, dtype=np.float32), GGMLType.F32))
    w.add_tensor("mat", extra_tensor_type, (3, 64), lambda: quantize(x, extra_tensor_type))
    w.write(path)
    return x


def test_round_trip_metadata_and_tensors(tmp_path):
    path = tmp_path / "m.gguf"
    x = write_small(path)
    f = GGUFFile(path)
    assert f.architecture == "llama" and f.metadata["llama.block_count"] == 2
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert f.metadata["flag"] is True and f.metadata["negative"] == -5
    assert f.value_types["llama.block_count"] == (ValueType.UINT32, None)
    assert f.value_types["tokenizer.ggml.scores"] == (ValueType.ARRAY, ValueType.FLOAT32)
    np.testing.assert_array_equal(f.tensors["vec"].dequantize(), np.arange(5))
    assert f.tensors["mat"].shape == (3, 64) and f.tensors["mat"].type == GGMLType.Q8_0
    np.testing.assert_allclose(f.tensors["mat"].dequantize(), x, atol=np.abs(x).max() / 127)


def test_tensors_are_views_of_the_mapped_file(tmp_path):
    path = tmp_path / "m.gguf"
    write_small(path)
    data = GGUFFile(path).tensors["mat"].data
    assert not data.flags.owndata and not data.flags.writeable


def test_the_file_loads_in_gguf_py(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    write_small(path)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == ["vec", "mat"]
    assert reader.fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("cut", [3, 20, 100, -30])  # -30: into the last tensor, past its padding
def test_truncated_file_is_rejected_with_its_name(tmp_path, cut):
    path = tmp_path / "m.gguf"
    write_small(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(ModelFileError, match="m.gguf"):
        GGUFFile(path)


def test_bad_magic_is_rejected(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile(path)


def patch_mat_info(path, skip: int, value: bytes) -> None:
    """Overwrite bytes of tensor "mat"'s info, `skip` bytes after its name."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"mat") + 3 + skip
    raw[at : at + len(value)] = value
    path.write_bytes(bytes(raw))


def test_tensor_offset_outside_the_file_is_rejected(tmp_path):
    path = tmp_path / "m.gguf"
    write_small(path)
    patch_mat_info(path, 4 + 16 + 4, struct.pack("<Q", 1 << 20))  # past n_dims, 2 dims, type: offset
    with pytest.raises(ModelFileError, match="'mat'.*outside"):
        GGUFFile(path)


def test_dimensions_whose_product_overflows_64_bits_are_rejected(tmp_path):
    """2^40 x 2^40 values: a product taken in 64-bit integers wraps to 0 bytes, which would fit."""
    path = tmp_path / "m.gguf"
    write_small(path)
    patch_mat_info(path, 4, struct.pack("<QQ", 1 << 40, 1 << 40))  # past n_dims: the two dimensions
    with pytest.raises(ModelFileError, match="'mat'.*outside"):
        GGUFFile(path)


def test_unsupported_tensor_type_is_rejected(tmp_path):
    path = tmp_path / "m.gguf"
    write_small(path)
    patch_mat_info(path, 4 + 16, struct.pack("<I", 20))  # type 20 is IQ4_NL: not one of ours
    with pytest.raises(ModelFileError, match="tensor type 20 is not supported"):
        GGUFFile(path)


def test_missing_file_and_folder_give_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(ModelFileError, match="cannot open"):
        GGUFFile(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_write_leaves_no_file(tmp_path, error):
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.add_tensor("ok", GGMLType.F32, (4,), lambda: np.zeros(16, np.uint8))

    def fail():
        raise error

    w.add_tensor("bad", GGMLType.F32, (4,), fail)
    with pytest.raises(type(error)):
        w.write(tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_string_array_running_past_the_end_is_rejected(tmp_path):
    path = tmp_path / "m.gguf"
    write_small(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b")  # the length prefix of token "b"
    raw[at : at + 8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="string array runs past the end"):
        GGUFFile(path)


def test_the_next_write_removes_partials_of_writers_that_were_killed(tmp_path):
    """A writer killed outright cannot clean up; the next write of that path removes what a dead
    process left, and leaves a running writer's file alone."""
    out = tmp_path / "model.gguf"
    dead = tmp_path / ".model.gguf.999999999.x1y2.partial"  # above any pid_max: never a running process
    alive = tmp_path / f".model.gguf.{os.getpid()}.z3.partial"
    other = tmp_path / ".other.gguf.999999999.q.partial"
    for f in (dead, alive, other):
        f.write_bytes(b"half a file")
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.write(out)
    assert out.exists() and not dead.exists() and alive.exists() and other.exists()


def test_sigterm_during_convert_leaves_no_partial_file(tiny, tmp_path):
    src = tiny("llama")[2]
    child = textwrap.dedent(f"""
        import sys, time
        from pocketlm.formats import gguf
        write = gguf.GGUFWriter.write
        def slow(self, path, on_tensor=None):
            def each(t):
                time.sleep(0.3)
                if on_tensor:
                    on_tensor(t)
            return write(self, path, each)
        gguf.GGUFWriter.write = slow
        from pocketlm.cli import main
        sys.exit(main(["convert", {str(src)!r}, {str(tmp_path / "out.gguf")!r}, "--quant", "q8_0", "--quiet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.gguf.*.partial")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert "terminated" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_a_split_model_opens_from_its_first_part_with_every_tensor_and_runs_as_one(tiny, tmp_path):
    from conftest import write_split

    from pocketlm.api import LlmInference

    _, _, whole = tiny("llama")
    parts = write_split(whole, tmp_path, "tiny", 3)
    split, ref = GGUFFile(parts[0]), GGUFFile(whole)
    assert [p.path for p in split.parts] == parts
    assert split.size == sum(p.stat().st_size for p in parts)
    assert split.tensors.keys() == ref.tensors.keys()
    for name, t in ref.tensors.items():
        assert split.tensors[name].shape == t.shape and bytes(split.tensors[name].data) == bytes(t.data)
    split.release_pages(split.tensors[list(ref.tensors)[-1]])  # a tensor of the last part's mapping
    options = dict(max_tokens=64, temperature=0.0, use_chat_template=False)
    want = LlmInference(whole, **options).generate_response("a b c", max_new_tokens=8)
    assert LlmInference(parts[0], **options).generate_response("a b c", max_new_tokens=8) == want


def test_a_split_model_names_the_part_to_open_and_the_part_that_is_missing(tiny, tmp_path):
    from conftest import write_split

    _, _, whole = tiny("llama")
    parts = write_split(whole, tmp_path, "tiny", 2)
    with pytest.raises(
        ModelFileError, match="part 2 of 2 of a split model; open its first part, tiny-00001-of-00002"
    ):
        GGUFFile(parts[1])
    renamed = parts[0].rename(tmp_path / "tiny.gguf")
    with pytest.raises(ModelFileError, match="must be named NAME-00001-of-00002.gguf"):
        GGUFFile(renamed)
    renamed.rename(parts[0])
    parts[1].unlink()
    with pytest.raises(
        ModelFileError, match="part 2 of 2 of this split model is missing: .*tiny-00002-of-00002.gguf"
    ):
        GGUFFile(parts[0])


def test_converting_a_split_model_writes_one_file_without_the_split_keys(tiny, tmp_path):
    from conftest import write_split

    from pocketlm.convert import ConversionConfig, convert

    _, _, whole = tiny("llama")
    parts = write_split(whole, tmp_path, "tiny", 2)
    out = GGUFFile(convert(parts[0], tmp_path / "joined.gguf", ConversionConfig(quant="f32"), progress=False))
    assert not [k for k in out.metadata if k.startswith("split.")] and len(out.parts) == 1
    assert {n: bytes(t.data) for n, t in out.tensors.items()} == {
        n: bytes(t.data) for n, t in GGUFFile(whole).tensors.items()
    }
