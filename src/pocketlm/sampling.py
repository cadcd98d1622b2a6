"""Samplers as small pure functions: `make_sampler(...)` returns `logits -> token id`.

Temperature 0 is greedy (argmax). Otherwise: scale by 1/temperature, keep the `top_k` best
(0 keeps all), keep the smallest set whose probability reaches `top_p`, draw with a seeded RNG.
"""

from __future__ import annotations

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


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= len(logits):
        return logits
    threshold = np.partition(logits, -k)[-k]
    return np.where(logits >= threshold, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    # keep tokens until the mass before them reaches p (the first token is always kept)
    keep = np.cumsum(probs) - probs < p
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def greedy(logits: np.ndarray) -> int:
    """Temperature 0: the largest logit (the first of equals)."""
    return int(np.argmax(logits))


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Sampler:
    validate(temperature, top_k, top_p)
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        # the largest logit first taken out: a tiny temperature then gives 0 and -inf, not inf - inf = NaN
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):
            scaled = (logits - np.max(logits)) / temperature
        probs = softmax(top_p_filter(top_k_filter(scaled, top_k), top_p))
        return int(rng.choice(len(probs), p=probs))

    return sample
