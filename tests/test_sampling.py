"""Samplers on tiny distributions."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm.errors import InvalidOptionError
from pocketlm.sampling import make_sampler, mulberry32

LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
# node -e 'import("./browser/src/runtime.js").then(({mulberry32}) => { const r = mulberry32(42);
#   console.log([r(), r(), r()].map((x) => Math.round(x * 2 ** 32))) })'
MULBERRY32_42 = [2581720956, 1925393290, 3661312704]


def test_temperature_zero_is_argmax():
    assert make_sampler(0.0)(np.array([0.1, 3.0, 2.0])) == 1


def drawn(logits, **options) -> set[int]:
    sample = make_sampler(1.0, seed=3, **options)
    return {sample(logits) for _ in range(400)}


def test_top_k_keeps_the_k_best_and_ties_by_the_lower_id():
    assert drawn(LOGITS, top_k=2) == {0, 1}
    assert drawn(np.array([1.0, 2.0, 1.0, 1.0, 0.5]), top_k=3) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert drawn(LOGITS, top_p=0.7) == {0, 1}
    assert drawn(LOGITS, top_p=0.5) == {0}
    assert drawn(LOGITS, top_p=0.81) == {0, 1, 2}
    assert drawn(LOGITS, top_k=2, top_p=0.81) == {0, 1}


def test_the_generator_is_mulberry32_as_the_browser_runtime_has_it():
    """The first draws of browser/src/runtime.js's mulberry32(42) (printed by Node)."""
    random = mulberry32(42)
    assert [round(random() * 2**32) for _ in range(3)] == MULBERRY32_42


def test_sampling_follows_the_distribution_and_respects_top_k():
    sample = make_sampler(1.0, top_k=3, seed=0)
    counts = np.bincount([sample(LOGITS) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts[:3], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    assert counts[3] == 0


def test_same_seed_same_draws():
    a, b = make_sampler(0.9, seed=7), make_sampler(0.9, seed=7)
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=-0.1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(temperature=float("nan")),
    ],
)
def test_bad_values_raise_one_clear_error(options):
    with pytest.raises(InvalidOptionError, match=next(iter(options))):
        make_sampler(**options)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-30])
def test_a_tiny_temperature_samples_the_best_token_instead_of_failing_on_nan(temperature):
    logits = np.array([3.0, 7.5, -2.0, 7.4], np.float32)
    sample = make_sampler(temperature, top_k=0, top_p=1.0, seed=1)
    assert [sample(logits) for _ in range(5)] == [1] * 5
