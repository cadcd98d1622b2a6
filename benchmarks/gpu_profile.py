"""Where a webgpu decode step spends its time, after a prompt of --context tokens:

- the replayed step as decode_step runs it, split into encoding (Python + wgpu calls), and submission
  to read-back of the logits (GPU work and the wait); and greedy steps as generate_tokens runs them,
  the token chosen on the GPU and the next step submitted before the last is read back;
- the GPU time of each kernel (linear layers by their number of workgroups): its dispatches of one
  step, replayed --repeat times in one pass and timed from submission to completion, less an empty
  pass (so launch gaps are included);
- the cost of one dispatch of an empty-sized kernel, the floor that fusing removes;
- the prompt's prefill, the first (which compiles what the load did not) and two more, split into
  encoding and submission to read-back;
- sampled steps (temperature 0.8, top-k 40) with the top 40 chosen on the GPU, and with whole rows read.

    python benchmarks/gpu_profile.py MODEL.gguf [--context 512] [--repeat 20]
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, "src")
from pocketlm import load  # noqa: E402
from pocketlm.engine import decode_step  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    lm = load(args.model, backend="webgpu")
    device = lm.ops.device
    print(f"{args.model} on {device.description}", flush=True)
    prompt = [10 + i % 1000 for i in range(args.context)]
    for run in ("first", "second", "third"):  # the first compiles what the load did not
        cache = lm.make_cache(args.context + 320)
        t0 = time.perf_counter()
        out = lm.model.forward(lm.ops, np.asarray(prompt, np.int64), cache)
        lm.ops._complete(out)
        t1 = time.perf_counter()
        lm.ops.to_host(out)
        seconds = time.perf_counter() - t0
        print(
            f"{run} prefill of {args.context} tokens: {1e3 * seconds:.1f} ms ({args.context / seconds:.0f} tok/s;"
            f" encoding {1e3 * (t1 - t0):.1f} ms, submit to read-back {1e3 * (seconds - t1 + t0):.1f})"
        )
    t0 = time.perf_counter()
    decode_step(lm, cache, 7)
    print(f"first decode step (records the plan): {1e3 * (time.perf_counter() - t0):.1f} ms")
    step = median_ms(lambda: decode_step(lm, cache, 7), 30)
    recorded = lm.step.recordings[cache]
    commands, out = recorded.commands, recorded.out
    print(f"replayed decode step: {step:.2f} ms ({1e3 / step:.0f} tok/s), {len(commands)} dispatches")

    from pocketlm.engine import greedy_tokens

    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for _ in greedy_tokens(lm, cache, 7, 48):
            n += 1
        per = (time.perf_counter() - t0) / n
        print(f"greedy steps chained on the GPU: {1e3 * per:.2f} ms a token ({1 / per:.0f} tok/s)")

    from pocketlm.sampling import make_sampler

    for on_gpu in (True, False):  # temperature 0.8, top-k 40: the API's defaults
        sampler, token = make_sampler(0.8, 40, 1.0, seed=1), 7
        t0 = time.perf_counter()
        for _ in range(48):
            if on_gpu:
                ids, logits = lm.ops.top_logits(lm.step, cache, token, 40)
                token = int(ids[sampler(logits)])
            else:
                token = sampler(decode_step(lm, cache, token))
        how = "the top 40 chosen on the GPU" if on_gpu else "whole rows read back and cut on the host"
        print(f"sampled steps, {how}: {1e3 * (time.perf_counter() - t0) / 48:.2f} ms a token")

    encode, wait = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        device.set_step(cache.offset, np.array([7]))
        device.replay(commands)
        t1 = time.perf_counter()
        lm.ops.to_host(out)
        t2 = time.perf_counter()
        cache.offset += 1
        encode.append(t1 - t0)
        wait.append(t2 - t1)
    print(
        f"encode {1e3 * statistics.median(encode):.2f} ms, "
        f"submit + GPU + read back {1e3 * statistics.median(wait):.2f} ms"
    )

    names = {id(p): k for k, p in device._pipelines.items()}
    by_kernel = defaultdict(list)
    for command in commands:  # linear layers apart by size (workgroups)
        kernel = names[id(command[0])]
        if kernel.startswith("linear"):
            kernel = f"{kernel} x{command[2][0] * command[2][1]}"
        by_kernel[kernel].append(command)
    sync = out.buf

    def timed(cmds) -> float:
        def once():
            device.replay(cmds)
            device.finish(sync, 0, 4)

        once()
        return median_ms(once, 5)

    empty = timed([])
    rows = []
    for kernel, cmds in by_kernel.items():
        total = timed(cmds * args.repeat) - empty
        rows.append((total / args.repeat, kernel, len(cmds)))
    print(f"GPU time per kernel in one step (each replayed {args.repeat}x; empty pass {empty:.2f} ms):")
    for ms, kernel, n in sorted(rows, reverse=True):
        print(f"  {kernel:<20} {n:4d} dispatches  {ms:7.3f} ms  ({1e3 * ms / n:6.1f} us each)")
    print(f"  sum {sum(r[0] for r in rows):.3f} ms")

    # one tiny elementwise dispatch, many times: the per-dispatch floor
    tiny = lm.ops.new((1,))
    device.commands = []
    lm.ops.elementwise("scale", tiny, s=1.0)
    one, device.commands = device.commands, None
    device.finish()
    n = 500
    per = (timed(one * n) - empty) / n
    print(f"one tiny dispatch: {1e3 * per:.1f} us on the GPU")
    t0 = time.perf_counter()
    for _ in range(20):
        device.replay(one * n)
        device.finish()
    print(f"encoding one dispatch: {1e6 * (time.perf_counter() - t0) / (20 * n):.1f} us of host time")


if __name__ == "__main__":
    main()
