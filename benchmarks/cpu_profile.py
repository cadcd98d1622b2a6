"""Where a CPU decode step's time goes: every op of the backend timed around its call (wall clock,
so a kernel's threads are inside its op), the cache update apart, and what is left of the step:
the model's Python between the ops and the engine's. Medians over the steps.

    NUMBA_NUM_THREADS=2 python benchmarks/cpu_profile.py MODEL [--context 512] [--tokens 64]
    POCKETLM_CPU_ISA=avx2 ... (a path of kernels.isa)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np

from pocketlm import load
from pocketlm.engine import decode_step, prefill
from pocketlm.kernels import isa

OPS = (
    "linear", "linears", "embedding", "rms_norm", "layer_norm", "silu", "gelu_tanh", "gelu", "softcap",
    "rope", "attention", "concat", "mix", "match_rms", "gaussian_topk",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    args = parser.parse_args()

    lm = load(args.model)
    ops, step_times = lm.ops, []
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(name, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
                calls[name] += 1

        return call

    for name in OPS:
        if hasattr(ops, name):
            setattr(ops, name, timed(name, getattr(ops, name)))
    cache = lm.make_cache(args.context + args.tokens + 8)
    for layer in cache.layers:
        if hasattr(layer, "update_and_fetch"):
            layer.update_and_fetch = timed("cache update", layer.update_and_fetch)
    rng = np.random.default_rng(0)
    prefill(lm, cache, rng.integers(10, min(1000, lm.model.vocab_size), args.context).tolist())
    calls.clear()
    per_step: dict[str, list[float]] = defaultdict(list)
    token = 7
    for _ in range(args.tokens):
        spent.clear()
        t0 = time.perf_counter()
        token = int(np.argmax(decode_step(lm, cache, token)))
        step_times.append(time.perf_counter() - t0)
        for name, seconds in spent.items():
            per_step[name].append(seconds)
        per_step["(the rest: the model's and the engine's Python)"].append(
            step_times[-1] - sum(spent.values())
        )
    n = args.tokens
    step = statistics.median(step_times)
    print(f"{lm.path.name}, kernel path {isa.selected()}, {args.context} tokens of context, {n} steps")
    print(f"decode step: median {1e3 * step:.2f} ms ({1 / step:.1f} tok/s)")
    print(f"{'op':<52} {'calls':>6} {'ms a step':>10} {'share':>6}")
    for name, values in sorted(per_step.items(), key=lambda kv: -statistics.median(kv[1])):
        ms = 1e3 * statistics.median(values)
        count = calls[name] // n if name in calls else ""
        print(f"{name:<52} {count:>6} {ms:>10.2f} {ms / (1e3 * step):>6.0%}")


if __name__ == "__main__":
    main()
