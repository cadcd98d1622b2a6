"""One generation worker per model: jobs run one at a time, first come first served.

The HTTP handlers (asyncio) submit a `Job` and read its events from an asyncio queue; the
worker thread runs the model and hands each text piece back through the event loop. A job whose
client went away is marked cancelled and stops at the next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..api import LlmInference
from ..structured import Grammar


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    grammar: Grammar | None = None  # constrained output (response_format or tools), checked by the handler
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (event, value))


class StopFilter:
    """Cuts the text at the first stop sequence, holding back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop sequence was hit)."""
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0
        )
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class GenerationWorker(threading.Thread):
    def __init__(self, llm: LlmInference, context_size: int):
        super().__init__(name="pocketlm-generation", daemon=True)
        self.llm, self.context_size = llm, context_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self._generate(job)
            except Exception as e:  # reported to this request (400 for a PocketLMError, else 500)
                job.emit("error", e)

    def _generate(self, job: Job) -> None:
        session = self.llm.create_session(
            max_tokens=self.context_size,
            temperature=job.temperature,
            top_k=job.top_k,
            top_p=job.top_p,
            random_seed=job.seed,
        )
        session.add_token_ids(job.prompt_ids)  # tokenized and checked against the context by the handler
        stops = StopFilter(job.stop)
        finish = None
        start = time.perf_counter()
        pieces = session.generate_response_stream(job.max_new_tokens, job.grammar)
        for piece in pieces:
            if job.cancelled.is_set():
                pieces.close()
                return
            text, hit = stops.feed(piece)
            if text:
                job.emit("text", text)
            if hit:
                finish = "stop"
                pieces.close()
                break
        if finish is None:
            tail = stops.flush()
            if tail:
                job.emit("text", tail)
        stats = session.last_stats
        job.emit(
            "done",
            {
                "finish_reason": finish or stats.finish_reason or "length",
                "prompt_tokens": len(job.prompt_ids),
                "completion_tokens": stats.generated_tokens,
                "seconds": time.perf_counter() - start,
            },
        )
