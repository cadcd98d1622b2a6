"""pocketlm against llama.cpp on the same GGUF file, side by side in one run.

Each round runs llama.cpp (llama-cpp-python, the `llamacpp` extra) and pocketlm, alternating,
each in a fresh process on the same prompt token ids, with 2 threads: prefill of the prompt in
one pass, then greedy decode. Medians over the rounds are printed with the ratio
pocketlm / llama.cpp (higher is better for speeds, lower for memory and time). Both keep a
float16 KV cache, their default (`--kv-cache f32` for pocketlm's float32 one).

    python benchmarks/compare_llamacpp.py smollm2-135m gemma3-270m --rounds 3
    python benchmarks/compare_llamacpp.py --isa avx2     # pocketlm's kernels forced to one path
    python benchmarks/compare_llamacpp.py --isa avx2 --llama-python /tmp/avx2/bin/python  # vs llama.cpp's AVX2

The first lines name the CPU (model and the ISA flags that matter) and pocketlm's kernel path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

if sys.argv[1:3] == ["--child", "pocketlm"]:
    # before numpy, as the CLI and `import pocketlm` do: pocketlm sets OpenBLAS's thread spin, which
    # OpenBLAS reads when numpy loads it (the llama.cpp child must not import pocketlm: see its RSS)
    import pocketlm  # noqa: F401

import numpy as np

# The environment as given, before pocketlm (imported below) adds its own thread settings:
# llama.cpp gets exactly this one.
ORIGINAL_ENV = dict(os.environ)
NO_REPACK = False  # --no-repack
ISA = None  # --isa: POCKETLM_CPU_ISA for pocketlm's children
KV_CACHE = "f16"  # --kv-cache: pocketlm's, float16 as llama.cpp's own cache unless asked
LLAMA_PYTHON = sys.executable  # --llama-python: the interpreter whose llama-cpp-python runs llama.cpp


def llama_cpp_child(path: str, ids: list[int], gen_tokens: int) -> dict:
    from llamacpp_peer import open_llama, peak_rss_mb  # not pocketlm's: its import weighs 80 MB

    start = time.perf_counter()
    llm = open_llama(
        path,
        repack=not os.environ.get("COMPARE_LLAMACPP_NO_REPACK"),  # see --no-repack
        n_ctx=len(ids) + gen_tokens + 8,
        n_batch=512,
        n_ubatch=512,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
    )
    load = time.perf_counter() - start
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # the logits of the batch's last token, as llama.cpp left them
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    start = time.perf_counter()
    llm.eval(ids)
    token = next_token()
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(gen_tokens - 1):
        llm.eval([token])
        token = next_token()
    decode = time.perf_counter() - start
    return {
        "load_seconds": load,
        "ttft_seconds": ttft,
        "prefill_tokens_per_second": len(ids) / ttft,
        "decode_tokens_per_second": (gen_tokens - 1) / decode,
        "peak_rss_mb": peak_rss_mb(),
    }


def pocketlm_child(path: str, ids: list[int], gen_tokens: int) -> dict:
    from pocketlm.bench import run_bench

    result = run_bench(path, len(ids), gen_tokens, prompt_ids=ids, kv_cache=os.environ["COMPARE_KV_CACHE"])
    return {
        k: getattr(result, k)
        for k in (
            "load_seconds",
            "ttft_seconds",
            "prefill_tokens_per_second",
            "decode_tokens_per_second",
            "peak_rss_mb",
            "weight_bytes",
        )
    }


def run_child(peer: str, path: str, ids_file: str, gen_tokens: int) -> dict:
    env = dict(
        ORIGINAL_ENV if peer == "llama.cpp" else os.environ, OMP_NUM_THREADS="2", NUMBA_NUM_THREADS="2"
    )
    if ISA and peer == "pocketlm":
        env["POCKETLM_CPU_ISA"] = ISA
        if ISA in ("avx2", "avxvnni"):  # BLAS (attention, float products) without AVX-512 too
            env["OPENBLAS_CORETYPE"] = "Haswell"
    if NO_REPACK:
        env["COMPARE_LLAMACPP_NO_REPACK"] = "1"
    env["COMPARE_KV_CACHE"] = KV_CACHE
    python = LLAMA_PYTHON if peer == "llama.cpp" else sys.executable
    cmd = [python, __file__, "--child", peer, path, ids_file, str(gen_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    """The CPU's model name and the flags that choose kernels, as lscpu / /proc/cpuinfo give them."""
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags)}"


def llama_build() -> str:
    """llama-cpp-python's version and the instruction sets its llama.cpp was built with."""
    code = "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
    out = subprocess.run([LLAMA_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout
    version, _, info = out.strip().partition(" ")
    built = " ".join(re.findall(r"(\w+) = 1", info))
    return f"llama-cpp-python {version} ({LLAMA_PYTHON}); built with: {built}"


def memory_bandwidth_gbs() -> float:
    """GB/s that 2 threads read here: numba sums 512 MB of float32, each thread its half into 16
    independent lanes (one accumulator is bound by the adds' latency, not by memory), best of 5."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def read_all(a):
        half = a.shape[0] // 2
        sums = np.zeros(2, np.float32)
        for c in prange(2):
            lanes = np.zeros(16, np.float32)
            for i in range(c * half, (c + 1) * half, 16):
                for j in range(16):
                    lanes[j] += a[i + j]
            sums[c] = lanes.sum()
        return sums.sum()

    a = np.ones(128 << 20, np.float32)
    read_all(a)
    best = min(_timed(read_all, a) for _ in range(5))
    return a.nbytes / best / 1e9


def _timed(f, *args) -> float:
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


METRICS = [  # name, key, format, higher is better
    ("prefill tok/s", "prefill_tokens_per_second", "{:.1f}", True),
    ("decode tok/s", "decode_tokens_per_second", "{:.1f}", True),
    ("time to first token s", "ttft_seconds", "{:.3f}", False),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}", False),
    ("load s", "load_seconds", "{:.2f}", False),
]


def compare(name: str, rounds: int, prompt_tokens: int, gen_tokens: int, bandwidth: float) -> dict:
    from pocketlm.bench import bench_prompt
    from pocketlm.formats.gguf import GGUFFile
    from pocketlm.registry import resolve_model
    from pocketlm.tokenizer import GGUFTokenizer

    path = str(resolve_model(name, auto_pull=True))
    # the tokenizer only: this process stays small while the children run (it used to build the
    # reference model, 1-2 GB of float32 weights, for the same ids)
    ids = bench_prompt(GGUFTokenizer(GGUFFile(path).metadata, path), prompt_tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    runs = {"llama.cpp": [], "pocketlm": []}
    run_child("pocketlm", path, f.name, 2)  # warm the numba cache and the page cache
    for r in range(rounds):
        for peer in ("llama.cpp", "pocketlm") if r % 2 == 0 else ("pocketlm", "llama.cpp"):
            runs[peer].append(run_child(peer, path, f.name, gen_tokens))
            print(
                f"  {name} round {r + 1}/{rounds} {peer}: decode {runs[peer][-1]['decode_tokens_per_second']:.1f} tok/s",
                file=sys.stderr,
            )
    os.unlink(f.name)
    median = {peer: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for peer, rs in runs.items()}
    size = os.path.getsize(path)
    ours = median["pocketlm"]
    bound = {"llama.cpp": bandwidth * 1e9 / size, "pocketlm": bandwidth * 1e9 / ours["weight_bytes"]}
    print(
        f"\n{name} ({size / 1e6:.0f} MB file; {prompt_tokens}-token prompt, {gen_tokens} decoded, 2 threads, "
        f"median of {rounds})"
    )
    print(f"{'metric':<24}{'llama.cpp':>12}{'pocketlm':>12}{'ratio':>8}")
    for label, key, fmt, _ in METRICS:
        a, b = median["llama.cpp"][key], ours[key]
        print(f"{label:<24}{fmt.format(a):>12}{fmt.format(b):>12}{b / a:>8.2f}")
    for peer in ("llama.cpp", "pocketlm"):
        frac = median[peer]["decode_tokens_per_second"] / bound[peer]
        print(
            f"{peer} decode = {frac:.0%} of its bandwidth bound ({bound[peer]:.0f} tok/s: its weights read once a token "
            f"at {bandwidth:.1f} GB/s; the KV cache read besides is not counted)"
        )
    return {"model": name, "median": median, "bandwidth_gbs": bandwidth, "bound_tokens_per_second": bound}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        peer, path, ids_file, gen_tokens = sys.argv[2:6]
        ids = json.load(open(ids_file))
        child = llama_cpp_child if peer == "llama.cpp" else pocketlm_child
        print(json.dumps(child(path, ids, int(gen_tokens))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--isa",
        help="force pocketlm's kernel path (POCKETLM_CPU_ISA: avx512vnni, avxvnni, avx2, "
        "i8mm, dotprod, portable; avx2 and avxvnni also keep numpy's OpenBLAS to its Haswell "
        "kernels, OPENBLAS_CORETYPE); default: the best this CPU runs",
    )
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="load llama.cpp without its repacked weight buffers (they segfault on AMX machines "
        "with llama-cpp-python 0.3.36)",
    )
    parser.add_argument(
        "--kv-cache",
        default="f16",
        choices=("f16", "f32"),
        help="pocketlm's KV cache (default f16: llama.cpp's own cache is float16)",
    )
    parser.add_argument(
        "--llama-python",
        default=sys.executable,
        help="the Python whose llama-cpp-python runs llama.cpp (e.g. a venv with an AVX2-only build, "
        "to time pocketlm's --isa avx2 on an AVX-512 machine against llama.cpp's AVX2 code)",
    )
    args = parser.parse_args()
    global NO_REPACK, ISA, KV_CACHE, LLAMA_PYTHON
    NO_REPACK, ISA, KV_CACHE, LLAMA_PYTHON = args.no_repack, args.isa, args.kv_cache, args.llama_python
    if ISA:
        os.environ["POCKETLM_CPU_ISA"] = ISA
    from pocketlm.kernels import isa

    isa.check()
    print(f"CPU: {machine()}; pocketlm kernels: {isa.PATH}")
    print(llama_build())
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth, 2 threads: {bandwidth:.1f} GB/s", file=sys.stderr)
    results = [compare(m, args.rounds, args.prompt_tokens, args.gen_tokens, bandwidth) for m in args.models]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
