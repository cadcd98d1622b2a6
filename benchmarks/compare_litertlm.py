"""pocketlm against LiteRT-LM (Google's runtime, CPU / XNNPACK) on the same weights, side by side.

LiteRT-LM runs a `.litertlm` file and pocketlm its own conversion of that same file (`pocketlm
convert`, done once before the rounds: INT8 per-channel weights become Q8_0 blocks holding the
same numbers), or a GGUF given with --gguf. Each round runs both, alternating, each in a fresh
process, 2 threads, a 512-token prompt then 128 decoded tokens (LiteRT-LM's own `Benchmark`;
pocketlm's `run_bench`), and the medians are printed with the ratio pocketlm / LiteRT-LM. Both
keep their caches between rounds (LiteRT-LM's weight cache folder, pocketlm's compiled kernels and
conversion) and both are warmed once before the rounds.

LiteRT-LM (`pip install litert-lm-api==0.18.1`) may live in another virtual environment: pass its
interpreter with --litert-python.

    python benchmarks/compare_litertlm.py --litertlm gemma3-270m-int8.litertlm --rounds 3 \\
        [--litert-python /path/to/venv/bin/python] [--gguf other.gguf]
    python benchmarks/compare_litertlm.py --litertlm gemma3-270m-int8.litertlm --greedy-text
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from compare_llamacpp import machine, memory_bandwidth_gbs

LITERT_CHILD = r"""
import json, resource, sys, time
import litert_lm
path, prefill, decode, cache_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
text = ("LiteRT-LM is an inference framework designed to run large language models on edge devices "
        "such as phones, laptops and single board computers. ")
prompt = " ".join(f"Paragraph {i}: {text}" for i in range(60))
start = time.perf_counter()
info = litert_lm.Benchmark(model_path=path, backend=litert_lm.Backend.CPU(thread_count=2),
                           prefill_tokens=prefill, decode_tokens=decode, max_num_tokens=prefill + decode + 64,
                           cache_dir=cache_dir, prompt=prompt).run()
print(json.dumps({"load_seconds": info.init_time_in_second, "ttft_seconds": info.time_to_first_token_in_second,
                  "prefill_tokens": info.last_prefill_token_count,
                  "prefill_tokens_per_second": info.last_prefill_tokens_per_second,
                  "decode_tokens_per_second": info.last_decode_tokens_per_second,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_seconds": time.perf_counter() - start}))
"""

# The text check: greedy replies (GREEDY_TOKENS long, no chat template) to these prompts, both runtimes
GREEDY_TOKENS = 32
GREEDY_PROMPTS = ("The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):")
LITERT_GREEDY_CHILD = r"""
import json, sys, tempfile
import litert_lm
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
engine = litert_lm.Engine(sys.argv[1], backend=litert_lm.Backend.CPU(thread_count=2), max_num_tokens=256,
                          cache_dir=tempfile.mkdtemp())
texts = []
for prompt in json.loads(sys.argv[2]):
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=int(sys.argv[3]),
        sampler_config=litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=1.0, seed=0))
    session.run_prefill([prompt])
    texts.append(session.run_decode().texts[0])
print(json.dumps(texts))
"""
POCKETLM_GREEDY_CHILD = r"""
import json, sys
from pocketlm import LlmInference
llm = LlmInference(sys.argv[1], max_tokens=256, temperature=0.0, use_chat_template=False)
print(json.dumps([llm.generate_response(p, max_new_tokens=int(sys.argv[3])) for p in json.loads(sys.argv[2])]))
"""


def greedy_texts(python: str, child: str, path: str) -> list[str]:
    cmd = [python, "-c", child, path, json.dumps(GREEDY_PROMPTS), str(GREEDY_TOKENS)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_greedy_text(litert_python: str, litertlm: str, gguf: str) -> None:
    """Print, per prompt, whether pocketlm's greedy reply starts with LiteRT-LM's (its texts, with
    the first character where they part)."""
    theirs = greedy_texts(litert_python, LITERT_GREEDY_CHILD, litertlm)
    ours = greedy_texts(sys.executable, POCKETLM_GREEDY_CHILD, gguf)
    same = 0
    for prompt, a, b in zip(GREEDY_PROMPTS, theirs, ours):
        b = b[: len(a)]
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        print(f"{prompt!r}: {'same' if a == b else f'parts at character {at}'}")
        if a != b:
            print(f"  LiteRT-LM: {a!r}\n  pocketlm:  {b!r}")
    print(f"greedy text ({GREEDY_TOKENS} tokens) the same for {same} of {len(GREEDY_PROMPTS)} prompts")


METRICS = [  # name, key, format
    ("prefill tok/s", "prefill_tokens_per_second", "{:.1f}"),
    ("decode tok/s", "decode_tokens_per_second", "{:.1f}"),
    ("time to first token s", "ttft_seconds", "{:.3f}"),
    ("load s", "load_seconds", "{:.2f}"),
    ("load + first token s", "load_and_first_seconds", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2")


def litert(python: str, path: str, prefill: int, decode: int, cache_dir: str) -> dict:
    cmd = [python, "-c", LITERT_CHILD, path, str(prefill), str(decode), cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=True).stdout
    return _with_total(json.loads(out.strip().splitlines()[-1]))


def _with_total(result: dict) -> dict:
    result["load_and_first_seconds"] = result["load_seconds"] + result["ttft_seconds"]
    return result


def pocketlm(path: str, prefill: int, decode: int, kv_cache: str) -> dict:
    code = (
        "import json, sys; from pocketlm.bench import run_bench; r = run_bench(sys.argv[1], int(sys.argv[2]), "
        "int(sys.argv[3]), kv_cache=sys.argv[4]); print(json.dumps({k: getattr(r, k) for k in ('load_seconds', "
        "'ttft_seconds', 'prefill_tokens_per_second', 'decode_tokens_per_second', 'peak_rss_mb')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, path, str(prefill), str(decode), kv_cache],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    ).stdout
    return _with_total(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--litertlm", required=True, help="the .litertlm file LiteRT-LM runs")
    parser.add_argument(
        "--gguf", help="a GGUF file for pocketlm to run instead of its conversion of the .litertlm file"
    )
    parser.add_argument(
        "--litert-python", default=sys.executable, help="a Python with litert-lm-api installed"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--kv-cache", default="f16", choices=("f16", "f32"), help="pocketlm's KV cache (default f16)"
    )
    parser.add_argument(
        "--greedy-text",
        action="store_true",
        help=f"instead of timing: whether both give the same greedy text ({GREEDY_TOKENS} tokens) for three prompts",
    )
    args = parser.parse_args()
    import tempfile

    from pocketlm.kernels import isa
    from pocketlm.registry import runnable_model

    print(f"CPU: {machine()}; pocketlm kernels: {isa.PATH}")
    gguf = args.gguf or str(runnable_model(args.litertlm))  # converted once, as `pocketlm run` does
    if args.greedy_text:
        compare_greedy_text(args.litert_python, args.litertlm, gguf)
        return
    cache_dir = tempfile.mkdtemp(prefix="litert-lm-cache-")
    pocketlm(gguf, 16, 4, args.kv_cache)  # the numba cache and the page cache, warmed
    litert(args.litert_python, args.litertlm, 16, 4, cache_dir)  # LiteRT-LM's weight cache, warmed
    runs = {"LiteRT-LM": [], "pocketlm": []}
    for r in range(args.rounds):
        for peer in ("LiteRT-LM", "pocketlm") if r % 2 == 0 else ("pocketlm", "LiteRT-LM"):
            if peer == "pocketlm":
                result = pocketlm(gguf, args.prompt_tokens, args.gen_tokens, args.kv_cache)
            else:
                result = litert(
                    args.litert_python, args.litertlm, args.prompt_tokens, args.gen_tokens, cache_dir
                )
            runs[peer].append(result)
            print(
                f"  round {r + 1}/{args.rounds} {peer}: decode {result['decode_tokens_per_second']:.1f} tok/s, "
                f"prefill {result['prefill_tokens_per_second']:.1f} tok/s",
                file=sys.stderr,
            )
    median = {
        peer: {k: statistics.median(run[k] for run in rs) for _, k, _ in METRICS} for peer, rs in runs.items()
    }
    print(
        f"\n{os.path.basename(args.litertlm)} vs {os.path.basename(gguf)} ({args.prompt_tokens}-token prompt, "
        f"{args.gen_tokens} decoded, 2 threads, median of {args.rounds})"
    )
    print(f"{'metric':<24}{'LiteRT-LM':>12}{'pocketlm':>12}{'ratio':>8}")
    for label, key, fmt in METRICS:
        a, b = median["LiteRT-LM"][key], median["pocketlm"][key]
        print(f"{label:<24}{fmt.format(a):>12}{fmt.format(b):>12}{b / a if a else float('nan'):>8.2f}")
    bandwidth = memory_bandwidth_gbs()
    sizes = {"LiteRT-LM": os.path.getsize(args.litertlm), "pocketlm": os.path.getsize(gguf)}
    for peer, size in sizes.items():
        bound = bandwidth * 1e9 / size
        print(
            f"{peer} decode = {median[peer]['decode_tokens_per_second'] / bound:.0%} of its bandwidth bound "
            f"({bound:.1f} tok/s: its {size / 1e6:.0f} MB file read once a token at {bandwidth:.1f} GB/s, 2 threads)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"runs": runs, "median": median, "bandwidth_gbs": bandwidth, "file_bytes": sizes}, f, indent=1
            )


if __name__ == "__main__":
    main()
