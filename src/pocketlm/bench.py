"""Measurements: perplexity over a text, the way llama.cpp's perplexity tool computes it."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .engine import LoadedModel
from .errors import ContextLengthError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(lm: LoadedModel, text: str, ctx: int = 512,
               on_chunk: Callable[[int, int, float], None] | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored). The text is cut into chunks of `ctx` tokens, each starting
    with BOS when the model adds one; only the second half of each chunk is scored, so every scored token sees at
    least ctx/2 tokens of context."""
    tokens = lm.tokenizer.encode(text)
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise ContextLengthError(f"the text has {len(tokens)} tokens, fewer than --ctx {ctx}; use a smaller --ctx")
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
