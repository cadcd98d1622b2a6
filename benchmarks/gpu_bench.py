"""Speed of the webgpu backend on a machine that has a GPU but not the model files.

The real files are too large to carry to the lent GPU machine, and speed does not depend on the
weights' values: `skeleton` saves a file's metadata (tokenizer included) and tensor table; `build`
writes a GGUF of the same names, types and shapes with random blocks; `run` benchmarks files.

    python benchmarks/gpu_bench.py skeleton smollm2-135m gemma3-270m --out .gpu/   # here
    python benchmarks/gpu_bench.py build .gpu/*.skeleton.json.gz --out /tmp/models   # there
    python benchmarks/gpu_bench.py run /tmp/models/*.gguf --backend webgpu cpu
    python benchmarks/gpu_bench.py web /tmp/models/*.gguf   # the browser's plan, replayed in Python

`web` exports each file as a web package and runs it the way the browser runtime does (the prefill
passes over bands of 512, 128 and 16 tokens, then greedy steps chained on the GPU by the plan's argmax
kernel, or where the host must copy table rows in, the top 1 chosen by its top-k kernels), through
`pocketlm.web.replay.PackageRunner`, beside the native backend decoding as generate_tokens does (greedy
steps chained on the GPU), alternating: where Chromium cannot be carried to the GPU machine, the plan's
own speed there.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pocketlm.formats.gguf import GGUFFile, GGUFWriter, ValueType  # noqa: E402
from pocketlm.formats.quants import BLOCK_LAYOUT, GGMLType  # noqa: E402


def _encode(value):
    if isinstance(value, np.ndarray):
        return {"ndarray": base64.b64encode(value.tobytes()).decode(), "dtype": value.dtype.str}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    return value


def _decode(value):
    if isinstance(value, dict) and "ndarray" in value:
        return np.frombuffer(base64.b64decode(value["ndarray"]), value["dtype"])
    if isinstance(value, dict) and "bytes" in value:
        return base64.b64decode(value["bytes"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def skeleton(models: list[str], out: Path) -> None:
    from pocketlm.registry import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    for name in models:
        path = resolve_model(name, auto_pull=True)
        f = GGUFFile(path)
        doc = {
            "file": path.name,
            "metadata": {
                k: [_encode(v), [int(t) if t is not None else None for t in f.value_types[k]]]
                for k, v in f.metadata.items()
                if k != "general.alignment"
            },
            "tensors": [[t.name, int(t.type), list(t.shape)] for t in f.tensors.values()],
        }
        target = out / f"{path.stem}.skeleton.json.gz"
        target.write_bytes(gzip.compress(json.dumps(doc).encode()))
        print(f"{target} ({target.stat().st_size / 1e6:.1f} MB)")


def random_tensor(tensor_type: GGMLType, shape, rng) -> np.ndarray:
    """Random bytes of a tensor, with float16 scale fields as a real file's are: small, finite and
    normal (0.001-0.01 in magnitude; a subnormal one would make the backend hold that matrix's scales
    as float32, which no real file here does)."""
    n = int(np.prod(shape))
    if tensor_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = (rng.standard_normal(n) * 0.02).astype(np.float32)
        if tensor_type == GGMLType.F32:
            return values.view(np.uint8)
        if tensor_type == GGMLType.F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block_size, type_size = BLOCK_LAYOUT[tensor_type]
    blocks = rng.integers(0, 256, (n // block_size, type_size), dtype=np.uint8)
    with_min = (GGMLType.Q4_1, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K)
    offsets = (
        [type_size - 2] if tensor_type == GGMLType.Q6_K else ([0, 2] if tensor_type in with_min else [0])
    )
    for at in offsets:
        scale = rng.uniform(0.001, 0.01, (len(blocks), 1)) * rng.choice([-1.0, 1.0], (len(blocks), 1))
        blocks[:, at : at + 2] = scale.astype("<f2").view(np.uint8)
    return blocks.reshape(-1)


def build(skeletons: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in skeletons:
        doc = json.loads(gzip.decompress(Path(s).read_bytes()))
        writer = GGUFWriter()
        for key, (value, types) in doc["metadata"].items():
            value = _decode(value)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            writer.add(key, value, *[ValueType(t) if t is not None else None for t in types])
        for name, tensor_type, shape in doc["tensors"]:
            tensor_type = GGMLType(tensor_type)
            writer.add_tensor(
                name,
                tensor_type,
                tuple(shape),
                lambda tensor_type=tensor_type, shape=shape: random_tensor(tensor_type, shape, rng),
            )
        target = out / doc["file"]
        writer.write(target)
        print(f"{target} ({target.stat().st_size / 1e6:.1f} MB)")


def run(files: list[str], backends: list[str], prompt_tokens: int, gen_tokens: int) -> None:
    import dataclasses

    from pocketlm.bench import run_bench

    for path in files:
        for backend in backends:
            for _attempt in range(2):  # the first run compiles kernels / pipelines
                r = run_bench(path, prompt_tokens, gen_tokens, backend)
            row = dataclasses.asdict(r)
            if backend == "webgpu":
                from pocketlm.engine import LoadedModel

                row["device"] = LoadedModel(path, backend="webgpu").ops.device.description
            print(json.dumps(row), flush=True)


def web(files: list[str], prompt_tokens: int, gen_tokens: int, rounds: int) -> None:
    for path in files:
        print(json.dumps(web_file(path, prompt_tokens, gen_tokens, rounds)), flush=True)


def web_file(path: str, prompt_tokens: int, gen_tokens: int, rounds: int) -> dict:
    import tempfile
    import time

    import numpy as np

    from pocketlm.engine import LoadedModel, greedy_tokens
    from pocketlm.web import export
    from pocketlm.web.replay import PackageRunner

    lm = LoadedModel(path, backend="webgpu")
    prompt = np.random.default_rng(0).integers(4, lm.model.vocab_size, prompt_tokens).tolist()
    with tempfile.TemporaryDirectory() as folder:
        package = export(
            path, Path(folder) / "web", max_tokens=prompt_tokens + gen_tokens + 16, progress=False
        )
        runner = PackageRunner(package)

        def plan() -> tuple[float, float]:
            t0 = time.perf_counter()
            logits = runner.feed(prompt, 0)
            t1 = time.perf_counter()
            token = int(np.argmax(logits))
            for k in range(gen_tokens):  # as the page decodes greedily
                if runner.chains:  # steps chained on the GPU
                    token = runner.greedy_next(token, prompt_tokens + k)
                else:  # the top 1 chosen on the GPU, the next step fed from the host
                    ids, logits = runner.run_top("decode", [token], prompt_tokens + k, 1)
                    token = int(ids[0]) if ids is not None else int(np.argmax(logits))
            return t1 - t0, time.perf_counter() - t1

        def native() -> tuple[float, float]:
            cache = lm.make_cache(prompt_tokens + gen_tokens + 16)
            t0 = time.perf_counter()
            logits = lm.ops.to_host(lm.model.forward(lm.ops, np.array(prompt), cache))[-1]
            t1 = time.perf_counter()
            for _ in greedy_tokens(lm, cache, int(np.argmax(logits)), gen_tokens):  # as generate_tokens
                pass
            return t1 - t0, time.perf_counter() - t1

        plan(), native()  # compile, record
        rows = {"plan": [], "native": []}
        for _ in range(rounds):
            rows["plan"].append(plan())
            rows["native"].append(native())
    out = {"model": Path(path).name, "device": lm.ops.device.description}
    for name, times in rows.items():
        out[f"{name}_prefill_tokens_per_second"] = prompt_tokens / float(np.median([t[0] for t in times]))
        out[f"{name}_decode_tokens_per_second"] = gen_tokens / float(np.median([t[1] for t in times]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("skeleton")
    p.add_argument("models", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("build")
    p.add_argument("skeletons", nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("files", nargs="+")
    p.add_argument("--backend", nargs="+", default=["webgpu"])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p = sub.add_parser("web")
    p.add_argument("files", nargs="+")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "skeleton":
        skeleton(args.models, args.out)
    elif args.command == "build":
        build(args.skeletons, args.out)
    elif args.command == "web":
        web(args.files, args.prompt_tokens, args.gen_tokens, args.rounds)
    else:
        run(args.files, args.backend, args.prompt_tokens, args.gen_tokens)


if __name__ == "__main__":
    main()
