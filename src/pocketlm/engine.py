"""Prefill and decode over one model and one preallocated KV cache, with stop rules.

Three layers, each small: `prefill` / `decode_step` (one forward pass each), `generate_tokens`
(the token loop), `stream_text` (token ids -> text pieces, never splitting a UTF-8 character).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, missing_capabilities
from .backends.cpu import DEFAULT_PREFILL, CpuBackend, check_prefill
from .errors import ContextLengthError, InvalidOptionError, ModelFileError, UnsupportedError
from .formats.gguf import GGUFFile
from .kvcache import DEFAULT_KV_CACHE, KVCache, cache_dtype
from .models import build_model
from .sampling import Sampler, greedy
from .structured import Constraint, Vocabulary
from .tokenizer import GGUFTokenizer

BACKENDS = ("cpu", "reference", "webgpu")


def make_backend(name: str, model, architecture: str, **options) -> Backend:
    """The backend `name` for `model`; a model that needs ops the backend lacks is refused in one
    line before the backend is even opened. `kv_cache` is the cpu backend's (the GPU's cache
    holds float32), and so is `prefill` ("int8" or "f32": `CpuBackend`; the GPU's products are float)."""
    kv_cache = options.pop("kv_cache", DEFAULT_KV_CACHE)
    cache_dtype(kv_cache)  # checked for every backend, though only the cpu one stores float16
    prefill = check_prefill(options.pop("prefill", DEFAULT_PREFILL))
    if name == "webgpu":
        from .backends.webgpu import WebGPUBackend as backend_class
    else:
        backend_class = CpuBackend
        options = {"fast": name == "cpu", "kv_cache": kv_cache, "prefill": prefill}
    missing = missing_capabilities(model, backend_class)
    if missing:
        raise UnsupportedError(
            f"the {name} backend cannot run this {architecture} model: it has no "
            f"{', '.join(sorted(missing))} (use --backend cpu)"
        )
    return backend_class(**options)


class LoadedModel:
    """A model file opened for inference: weights mapped, tokenizer built, backend chosen."""

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str = "cpu",
        ple_in_ram: bool = False,
        kv_cache: str = DEFAULT_KV_CACHE,
        **backend_options,
    ):
        """`ple_in_ram` copies the tables a model reads row by row from the file (Gemma 3n's
        per-layer embeddings) into memory instead, for comparison. `kv_cache` ("f16", "f32"):
        what the cpu backend's KV cache holds (the reference and webgpu backends hold float32)."""
        if backend not in BACKENDS:
            raise InvalidOptionError(
                f"backend {backend!r} is not available (available: {', '.join(BACKENDS)})"
            )
        self.file = GGUFFile(path)
        self.path = self.file.path
        try:
            self.model = build_model(self.file.metadata, self.file.tensors)
        except ModelFileError as e:
            raise ModelFileError(f"{self.path}: {e}") from None
        # The tokenizer first: building it needs transient memory, best spent before the weights.
        self.tokenizer = GGUFTokenizer(self.file.metadata, str(self.path))
        for key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
        ):
            self.file.metadata.pop(
                key, None
            )  # built into the tokenizer; as Python objects they are tens of MB
        self.ops = make_backend(
            backend, self.model, self.file.architecture, kv_cache=kv_cache, **backend_options
        )
        self.step = self.ops.capture(self.model.forward)  # one decode step (the GPU replays it)
        # Repack weights now, not in the first prefill; the repacked copy is what runs, so each
        # tensor's file pages are let go as soon as it is done (peak memory holds one copy).
        streamed = getattr(self.model, "streamed", frozenset())
        self.ops.prepare(
            [t for t in self.file.tensors.values() if t.name not in streamed],
            on_packed=self.file.release_pages,
            copy_out=self._copy_out,
        )
        for name in streamed if ple_in_ram else ():
            self.ops.pin(name, self._copy_out(self.file.tensors[name]))
        # tensors read from the file per token
        self.streamed = frozenset() if ple_in_ram else frozenset(streamed)
        self.streamed_bytes = sum(self.file.tensors[n].nbytes for n in self.streamed)
        self.architecture = self.file.architecture
        self.context_length = int(self.model.args.context_length)
        try:
            self.ops.warm_up(self.model, self.make_cache)
        except ModelFileError as e:
            raise ModelFileError(f"{self.path}: {e}") from None
        except (ValueError, IndexError) as e:  # numpy's reshape or broadcast of tensors that do not fit
            raise ModelFileError(
                f"{self.path}: the tensors do not fit the model's hyper-parameters ({e})"
            ) from None

    def _copy_out(self, tensor, chunk: int = 1 << 24) -> np.ndarray:
        """A resident copy of a tensor's bytes, its file pages let go chunk by chunk (so that the
        copy, not the copy plus the file, is what memory holds)."""
        copy = np.empty_like(tensor.data)
        for begin in range(0, tensor.nbytes, chunk):
            copy[begin : begin + chunk] = tensor.data[begin : begin + chunk]
            self.file.release_pages(tensor, begin, begin + chunk)
        return copy

    def make_cache(self, max_tokens: int) -> KVCache:
        if max_tokens > self.context_length:
            raise InvalidOptionError(
                f"max_tokens {max_tokens} exceeds the model's context length {self.context_length}"
            )
        return self.model.make_cache(max_tokens, self.ops.layer_cache)

    def logits(self, token_ids: Iterable[int]) -> np.ndarray:
        """Logits [n_tokens, vocab] for `token_ids` from one prefill over a fresh cache."""
        ids = np.asarray(list(token_ids), np.int64)
        self.check_ids(ids)
        cache = self.make_cache(max(len(ids), 1))
        return self.ops.to_host(self.model.forward(self.ops, ids, cache, all_logits=True))

    @functools.cached_property
    def grammar_vocabulary(self) -> Vocabulary:
        """The vocabulary as the grammar engine sees it, built on first use (0.4-2 s)."""
        return Vocabulary(self.tokenizer, self.model.vocab_size)

    def check_ids(self, ids: np.ndarray) -> None:
        vocab = self.model.vocab_size
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            raise InvalidOptionError(f"token ids must be in [0, {vocab}), got {ids.min()}..{ids.max()}")


def check_room(cache: KVCache, n_new: int) -> None:
    if cache.offset + n_new > cache.max_tokens:
        raise ContextLengthError(
            f"{cache.offset + n_new} tokens do not fit in max_tokens={cache.max_tokens} "
            f"({cache.offset} already in the context, {n_new} new); raise max_tokens or shorten the prompt"
        )


def prefill(lm: LoadedModel, cache: KVCache, ids: list[int]) -> np.ndarray:
    """Run the whole prompt in one pass; returns the logits of its last token."""
    check_room(cache, len(ids))
    return lm.ops.to_host(lm.model.forward(lm.ops, np.asarray(ids, np.int64), cache))[-1]


def decode_step(lm: LoadedModel, cache: KVCache, token: int) -> np.ndarray:
    """The logits after one more token (through the backend's captured step)."""
    return lm.ops.to_host(lm.step(np.array([token], np.int64), cache))[-1]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (EOS / stop token) or "length" (max_tokens reached)
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.generated_tokens - 1  # the first token comes from prefill
        return n / self.decode_seconds if self.decode_seconds and n > 0 else 0.0


def generate_tokens(
    lm: LoadedModel,
    cache: KVCache,
    prompt_ids: list[int],
    sampler: Sampler,
    stats: GenerationStats | None = None,
    max_new_tokens: int | None = None,
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Prefill `prompt_ids`, then sample until a stop token, `max_new_tokens` or a full cache.
    With a `constraint`, only tokens its grammar allows are sampled, and the reply ends (as at a
    stop token) once the grammar is complete.

    The stop token itself is consumed but not yielded; the last yielded token is left out of the
    cache (it is fed at the start of the next turn), so a session can continue from here.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    logits = prefill(lm, cache, prompt_ids)
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = _sampled(lm, cache, logits, sampler, constraint, max_new_tokens or cache.max_tokens)
    try:
        for token in tokens:
            stats.token_ids.append(token)
            if token in lm.tokenizer.stop_ids:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            if constraint is not None:
                constraint.accept(token)
            yield token
            if constraint is not None and constraint.done:
                stats.finish_reason = "stop"
                break
            if cache.offset + 1 >= cache.max_tokens or stats.generated_tokens == max_new_tokens:
                stats.finish_reason = "length"
                break
            stats.decode_seconds = time.perf_counter() - start
    finally:
        tokens.close()  # a step run ahead of this loop is not counted in the cache
    stats.decode_seconds = time.perf_counter() - start


def _check_finite(lm: LoadedModel, logits: np.ndarray | None) -> None:
    if logits is None or not math.isfinite(float(np.max(logits))):  # NaN propagates through max
        raise ModelFileError(f"{lm.path}: the model computed NaN or infinite logits: its weights are corrupt")


def _sampled(lm, cache, logits, sampler, constraint, limit: int) -> Iterator[int]:
    """The token after the prompt, then one after each decode step, each computed only when the
    next is asked for. Greedy and unconstrained on a backend that chooses tokens itself
    (`greedy_tokens`), the steps after the first are chained there; with a top-k cut on a backend
    that finds the top k logits itself (`top_logits`), only those are read back and drawn from."""
    top_logits = getattr(lm.ops, "top_logits", None) if constraint is None else None
    top_k = getattr(sampler, "top_k", 0) if top_logits else 0
    ids = None  # the token ids of `logits` where they are the top k only
    for sampled in range(limit):
        _check_finite(lm, logits)
        if constraint is not None:  # told how many tokens the reply may still have, to close in time
            logits = constraint.mask(logits, min(limit - sampled, cache.max_tokens - cache.offset))
        token = sampler(logits) if ids is None else int(ids[sampler(logits)])
        yield token
        if sampler is greedy and constraint is None:
            yield from greedy_tokens(lm, cache, token, limit - 1)
            return
        if top_k:
            ids, logits = top_logits(lm.step, cache, token, top_k)
        else:
            logits = decode_step(lm, cache, token)


def greedy_tokens(lm: LoadedModel, cache: KVCache, token: int, limit: int) -> Iterator[int]:
    """Up to `limit` greedy tokens after `token` (fed first), each fed to the next step; a token is
    in the cache once the next is asked for. A backend's own `greedy_tokens` chains the steps on
    its device (the webgpu backend's: token choice on the GPU, the next step submitted before the
    last is read back)."""
    own = getattr(lm.ops, "greedy_tokens", None)
    if own is not None:
        for chosen in own(lm.step, cache, token, limit):
            if chosen < 0:
                _check_finite(lm, None)
            yield chosen
        return
    for _ in range(limit):
        logits = decode_step(lm, cache, token)
        _check_finite(lm, logits)
        token = int(np.argmax(logits))
        yield token


def stream_text(tokenizer: GGUFTokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces for a token stream; holds back bytes until they form whole characters."""
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the rest
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        emitted = text
