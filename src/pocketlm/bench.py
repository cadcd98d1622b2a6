"""Measurements: perplexity (as llama.cpp's perplexity tool computes it) and speed (the metrics of
the MediaPipe and Gemma 3n tables: file size, time to first token, prefill and decode tokens/s,
peak RSS)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

from .backends.cpu import DEFAULT_PREFILL
from .engine import LoadedModel
from .errors import ContextLengthError
from .kvcache import DEFAULT_KV_CACHE


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(
    lm: LoadedModel, text: str, ctx: int = 512, on_chunk: Callable[[int, int, float], None] | None = None
) -> tuple[float, int]:
    """(perplexity, tokens scored). The text is cut into chunks of `ctx` tokens, each starting
    with BOS when the model adds one; only the second half of each chunk is scored, so every scored token sees at
    least ctx/2 tokens of context."""
    tokens = lm.tokenizer.encode(text)
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise ContextLengthError(
            f"the text has {len(tokens)} tokens, fewer than --ctx {ctx}; use a smaller --ctx"
        )
    nll, count = 0.0, 0
    first = ctx // 2
    for c in range(n_chunks):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        if lm.tokenizer.add_bos and lm.tokenizer.bos_id is not None:
            chunk = [lm.tokenizer.bos_id] + chunk[1:]
        logprobs = log_softmax(lm.logits(chunk).astype(np.float64))
        targets = np.asarray(chunk[first + 1 :])
        nll -= logprobs[np.arange(first, ctx - 1), targets].sum()
        count += len(targets)
        if on_chunk:
            on_chunk(c + 1, n_chunks, float(np.exp(nll / count)))
    return float(np.exp(nll / count)), count


@dataclass
class BenchResult:
    model: str
    file_mb: float
    prompt_tokens: int
    generated_tokens: int
    load_seconds: float
    ttft_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    peak_rss_mb: float  # the whole process's, load included
    start_to_first_token_seconds: float
    backend: str
    weight_bytes: (
        int  # the weights the backend computes with (repacked, or the file's Q8_0), read once per token
    )
    params_resident: int = 0  # parameters in memory
    params_streamed: int = 0  # parameters left in the file and read per token (Gemma 3n's PLE)
    streamed_bytes: int = 0
    dispatches_per_token: int | None = None  # GPU kernel dispatches of one decode step (webgpu)
    kv_cache: str = "f32"  # what the KV cache held
    prefill: str = "f32"  # how the prompt met quantized weights: int8 or f32 activations
    run_peak_rss_mb: float | None = None  # peak while prefilling and decoding, after the load (Linux)


def bench_prompt(tokenizer, n_tokens: int) -> list[int]:
    """n_tokens of real text (a passage repeated), so attention sees realistic content."""
    text = (files("pocketlm") / "bench_text.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    while len(ids) < n_tokens:
        ids += ids
    return ids[:n_tokens]


def peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, unlike ru_maxrss, starts afresh at exec
    (ru_maxrss keeps the parent's figure in a forked child)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Start the peak (VmHWM) afresh from the current resident size, where Linux allows it
    (`/proc/self/clear_refs`); whether it did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_age_seconds() -> float:
    """Seconds since this process started (from /proc), 0 where that is not available."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_bench(
    path: str | os.PathLike,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    backend: str = "cpu",
    on_progress: Callable[[str], None] | None = None,
    prompt_ids: list[int] | None = None,
    ple_in_ram: bool = False,
    kv_cache: str = DEFAULT_KV_CACHE,
    prefill: str = DEFAULT_PREFILL,
) -> BenchResult:
    """Load, prefill a prompt in one pass, decode `gen_tokens` greedily (stop tokens ignored)."""
    from .engine import greedy_tokens
    from .engine import prefill as add_prompt

    say = on_progress or (lambda message: None)
    start = time.perf_counter()
    lm = LoadedModel(path, backend=backend, ple_in_ram=ple_in_ram, kv_cache=kv_cache, prefill=prefill)
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss_mb()
    run_peak_known = reset_peak_rss()  # what prefill and decode hold, apart from the load's transients
    ids = prompt_ids if prompt_ids is not None else bench_prompt(lm.tokenizer, prompt_tokens)
    cache = lm.make_cache(prompt_tokens + gen_tokens)
    say(f"prefill {prompt_tokens} tokens")
    start = time.perf_counter()
    logits = add_prompt(lm, cache, ids)
    token = int(np.argmax(logits))
    ttft = time.perf_counter() - start
    start_to_first = process_age_seconds()
    start = time.perf_counter()
    for i, _ in enumerate(greedy_tokens(lm, cache, token, gen_tokens - 1)):  # as generate_tokens decodes
        if i % 16 == 0:
            say(f"decode {i}/{gen_tokens}")
    decode_seconds = time.perf_counter() - start
    run_peak = peak_rss_mb()
    count = getattr(lm.step, "dispatches", None)
    return BenchResult(
        model=str(lm.path.name),
        file_mb=lm.file.size / 1e6,
        prompt_tokens=prompt_tokens,
        generated_tokens=gen_tokens,
        load_seconds=load_seconds,
        ttft_seconds=ttft,
        prefill_tokens_per_second=prompt_tokens / ttft,
        decode_tokens_per_second=(gen_tokens - 1) / decode_seconds if gen_tokens > 1 else 0.0,
        peak_rss_mb=max(load_peak, run_peak),
        start_to_first_token_seconds=start_to_first,
        backend=backend,
        weight_bytes=lm.ops.weight_bytes,
        streamed_bytes=lm.streamed_bytes,
        params_streamed=sum(t.n_elements for t in lm.file.tensors.values() if t.name in lm.streamed),
        params_resident=sum(t.n_elements for t in lm.file.tensors.values() if t.name not in lm.streamed),
        dispatches_per_token=count(cache) if count else None,
        kv_cache=kv_cache if backend == "cpu" else "f32",
        prefill="int8" if getattr(lm.ops, "int8_prefill", False) else "f32",
        run_peak_rss_mb=run_peak if run_peak_known else None,
    )
