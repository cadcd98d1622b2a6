"""Samplers as small pure functions: `make_sampler(...)` returns `logits -> token id`.

Temperature 0 is greedy (argmax). Otherwise: scale by 1/temperature, keep the `top_k` best
(0 keeps all), keep the smallest set whose probability reaches `top_p`, draw with a seeded RNG.
The browser runtime (`browser/src/runtime.js`, `makeSampler`) does the same arithmetic in the same
order with the same RNG (mulberry32), so a seed gives the same text in Python and in the page.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np

from .errors import InvalidOptionError

Sampler = Callable[[np.ndarray], int]


def validate(temperature: float, top_k: int, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
        raise InvalidOptionError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise InvalidOptionError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InvalidOptionError(f"top_p must be in (0, 1], got {top_p!r}")


def greedy(logits: np.ndarray) -> int:
    """Temperature 0: the largest logit (the first of equals)."""
    return int(np.argmax(logits))


def mulberry32(seed: int) -> Callable[[], float]:
    """Uniform floats in [0, 1) from a 32-bit state: the generator the browser runtime uses."""
    mask = 0xFFFFFFFF
    state = seed & mask

    def random() -> float:
        nonlocal state
        state = (state + 0x6D2B79F5) & mask
        t = ((state ^ (state >> 15)) * (state | 1)) & mask
        t ^= (t + ((t ^ (t >> 7)) * (t | 61))) & mask
        return ((t ^ (t >> 14)) & mask) / 4294967296

    return random


def draw(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float, random: Callable[[], float]
) -> int:
    """One token. The kept tokens: all, or where top_k or top_p cut, the first top_k of the logits
    sorted best first (ties by id), then the prefix whose weight before each token is under top_p of
    theirs. Their weights exp((l - best) / temperature), summed in id order; the token is the first
    whose running sum exceeds random() times the total."""
    values = np.asarray(logits, np.float64)
    values = np.where(np.isnan(values), -np.inf, values)
    best = int(np.argmax(values))

    def weights(ids: np.ndarray) -> np.ndarray:
        # the best logit taken out first: a tiny temperature then gives 0 and -inf, not inf - inf = NaN
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.exp((values[ids] - values[best]) / temperature)
        w[ids == best] = 1.0
        return np.nan_to_num(w, nan=0.0)

    kept = np.arange(len(values))
    cut_k = 0 < top_k < len(values)
    if cut_k or top_p < 1.0:
        if cut_k:  # the top_k best, ties by id: every id at or above the k-th value, sorted
            threshold = -np.partition(-values, top_k - 1)[top_k - 1]
            order = np.flatnonzero(values >= threshold)
        else:
            order = kept
        order = order[np.argsort(-values[order], kind="stable")]
        if cut_k:
            order = order[:top_k]
        if top_p < 1.0:
            w = weights(order)
            running = np.cumsum(w)  # left to right, as the browser adds them
            order = order[: max(1, int(np.count_nonzero(running - w < top_p * running[-1])))]
        kept = np.sort(order)
    running = np.cumsum(weights(kept))
    j = int(np.searchsorted(running, random() * running[-1], side="right"))
    return int(kept[min(j, len(kept) - 1)])


class RandomSampler:
    """`draw` with these settings and one RNG: `sampler(logits)` is a token id. Its `top_k` tells a
    backend that can choose the top k logits itself (`top_logits`) which to give it: drawn from the k
    largest in id order, a token is the one drawn from the whole row (the same RNG draw, the same
    weights), so the RNG need not leave the host."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.random = mulberry32(seed)

    def __call__(self, logits: np.ndarray) -> int:
        return draw(logits, self.temperature, self.top_k, self.top_p, self.random)


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Sampler:
    validate(temperature, top_k, top_p)
    if temperature == 0:
        return greedy
    return RandomSampler(temperature, top_k, top_p, secrets.randbits(32) if seed is None else seed)
