"""Fuzz the model loader: mutated copies of a GGUF file, each loaded and run for a few tokens in a
worker process, classified as

    error      a PocketLMError of one line (what a user should see)
    loaded     the file loaded and generated (the mutation was harmless)
    traceback  any other exception (a bug: the user sees a traceback)
    crash      the worker died (a signal, e.g. SIGSEGV)
    hang       no answer within the time limit

Mutations: random bytes in the header (metadata and tensor table), extreme integers (0, 1, 2^31,
2^32 - 1, 2^63, 2^64 - 1) written over aligned 4- and 8-byte fields of the header, truncation, and
NaN / infinity written over tensor data. The worker stays up between cases (its numba kernels
loaded once) and is started again after a crash or a hang; its address space is capped.

    python scripts/fuzz_gguf.py model.gguf --cases 10000 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

OUTCOMES = ("error", "loaded", "traceback", "crash", "hang")
EXTREMES = (0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)
MEMORY_LIMIT = 8 << 30  # bytes of address space for the worker


def mutate(data: bytes, header: int, rng: random.Random) -> tuple[str, bytes]:
    """One mutated copy of the file's bytes and what was done."""
    raw = bytearray(data)
    mutation = rng.choice(("flip", "flip", "extreme", "extreme", "truncate", "nan"))
    if mutation == "flip":
        n = rng.choice((1, 2, 4, 16))
        for _ in range(n):
            raw[rng.randrange(header)] = rng.randrange(256)
        return f"flip {n} header bytes", bytes(raw)
    if mutation == "extreme":
        width = rng.choice((4, 8))
        at = rng.randrange(0, max(header - width, 1)) // width * width
        value = rng.choice(EXTREMES) % (1 << (8 * width))
        raw[at : at + width] = value.to_bytes(width, "little")
        return f"u{8 * width} {value} at {at}", bytes(raw)
    if mutation == "truncate":
        cut = rng.randrange(len(raw))
        return f"truncate at {cut}", bytes(raw[:cut])
    at = rng.randrange(header, max(len(raw) - 2, header + 1))
    raw[at : at + 2] = struct.pack("<e", rng.choice((float("nan"), float("inf"), -float("inf"))))
    return f"nan/inf f16 at {at}", bytes(raw)


def _worker(requests, replies, warm_path: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.stderr = open(os.devnull, "w")  # tqdm, warnings
    from pocketlm.engine import LoadedModel, generate_tokens
    from pocketlm.errors import PocketLMError
    from pocketlm.sampling import make_sampler

    def run(path: str) -> tuple[str, str]:
        try:
            lm = LoadedModel(path)
            ids = lm.tokenizer.encode_chat(
                [{"role": "user", "content": "Hi there"}], architecture=lm.architecture
            )
            cache = lm.make_cache(min(len(ids) + 4, lm.context_length))
            list(generate_tokens(lm, cache, ids[: cache.max_tokens - 1], make_sampler(0.7, 40, 0.9, 0)))
            return "loaded", ""
        except PocketLMError as e:
            return ("error", str(e)) if "\n" not in str(e) else ("traceback", f"multi-line error: {e!r}")
        except Exception as e:  # noqa: BLE001 (what the fuzzer is looking for)
            return "traceback", f"{type(e).__name__}: {e}"[:500]

    run(warm_path)
    replies.put(("ready", ""))
    while (path := requests.get()) is not None:
        replies.put(run(path))


class Worker:
    def __init__(self, warm_path: str):
        self.warm_path = warm_path
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_worker, args=(self.requests, self.replies, self.warm_path), daemon=True
        )
        self.process.start()
        self.replies.get(timeout=600)

    def classify(self, path: str, timeout: float) -> tuple[str, str]:
        self.requests.put(path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.replies.get(timeout=0.2)
            except Exception:  # queue.Empty
                if not self.process.is_alive():
                    code = self.process.exitcode
                    self.start()
                    return "crash", f"worker exit code {code}"
        self.process.kill()
        self.process.join()
        self.start()
        return "hang", f"no answer in {timeout:g} s"

    def close(self) -> None:
        self.requests.put(None)
        self.process.join(timeout=10)


def fuzz(path: str | os.PathLike, cases: int, seed: int = 0, timeout: float = 30.0, progress=None) -> dict:
    """Run `cases` mutations of the file; returns counts per outcome and examples of the bad outcomes."""
    from pocketlm.formats.gguf import GGUFFile

    data = Path(path).read_bytes()
    header = GGUFFile(path).data_start
    rng = random.Random(seed)
    counts, examples = collections.Counter(), collections.defaultdict(list)
    worker = Worker(str(path))
    # each case is a whole copy of the file: in memory (/dev/shm) where there is one, not on disk
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        case_path = os.path.join(tmp, "case.gguf")
        try:
            for i in range(cases):
                what, mutated = mutate(data, header, rng)
                with open(case_path, "wb") as f:
                    f.write(mutated)
                outcome, detail = worker.classify(case_path, timeout)
                counts[outcome] += 1
                if outcome in ("traceback", "crash", "hang") and len(examples[outcome]) < 20:
                    examples[outcome].append(f"case {i} ({what}): {detail}")
                if progress:
                    progress(i + 1, counts)
        finally:
            worker.close()
    return {"cases": cases, "counts": {k: counts[k] for k in OUTCOMES}, "examples": dict(examples)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a GGUF file to mutate (a small one: every case loads it)")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    args = parser.parse_args()
    start = time.monotonic()

    def progress(done, counts):
        if done % 100 == 0 or done == args.cases:
            print(
                f"{done}/{args.cases} " + " ".join(f"{k} {counts[k]}" for k in OUTCOMES),
                file=sys.stderr,
                flush=True,
            )

    result = fuzz(args.model, args.cases, args.seed, args.timeout, progress)
    print(
        f"{result['cases']} cases in {time.monotonic() - start:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    )
    for outcome, lines in result["examples"].items():
        print(f"\n{outcome}:")
        for line in lines:
            print(f"  {line}")
    sys.exit(1 if any(result["counts"][k] for k in ("traceback", "crash", "hang")) else 0)


if __name__ == "__main__":
    main()
