"""Where a webgpu decode step spends its time: recording (the model's Python and the wgpu calls),
submission and the wait for the logits. python benchmarks/gpu_profile.py MODEL.gguf"""

import sys
import time

import numpy as np

sys.path.insert(0, "src")
from pocketlm import load  # noqa: E402
from pocketlm.engine import prefill  # noqa: E402

lm = load(sys.argv[1], backend="webgpu")
cache = lm.make_cache(256)
prefill(lm, cache, list(range(10, 60)))
device = lm.ops.device
for _ in range(5):
    t0 = time.perf_counter()
    device.trace = []
    out = lm.model.forward(lm.ops, np.array([7]), cache)
    t1 = time.perf_counter()
    lm.ops.to_host(out)
    t2 = time.perf_counter()
    n = len(device.trace)
    device.trace = None
    print(
        f"record {1e3 * (t1 - t0):.1f} ms, submit + wait {1e3 * (t2 - t1):.1f} ms, {n} dispatches", flush=True
    )

from pocketlm.engine import decode_step  # noqa: E402

token = 7
for _ in range(5):
    t0 = time.perf_counter()
    logits = decode_step(lm, cache, token)
    print(f"replayed decode step {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)

# the replay split: encoding the recorded commands (Python + wgpu calls) vs submission and the wait
plan = next(iter(lm.ops._decode_plans.values()))
for _ in range(5):
    t0 = time.perf_counter()
    device.set_step(cache.offset, np.array([token]))
    device.replay(plan[2])
    t1 = time.perf_counter()
    lm.ops.to_host(plan[3])
    t2 = time.perf_counter()
    cache.offset += 1
    print(f"encode {1e3 * (t1 - t0):.1f} ms, submit + GPU + read back {1e3 * (t2 - t1):.1f} ms", flush=True)
