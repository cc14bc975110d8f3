"""The one-run audit's epsilon lower bound (Steinke, Nasr, Jagielski 2023) against values
derived by hand, an independent transcription of the paper's formula, and randomized response."""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction

import pytest

from medfed.errors import PrivacyError
from medfed.privacy.one_run_audit import (
    audit_scores,
    epsilon_lower_bound,
    guess_counts_for,
    p_value,
)


def _all_correct_pure_dp(guesses: int, confidence: float) -> float:
    """v = r, delta = 0: the p-value is q^r, so the bound solves r * log(1 + e^-eps) = log(1/b)."""
    return -math.log(math.expm1(math.log(1.0 / (1.0 - confidence)) / guesses))


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value transcribed with exact binomial coefficients (small r only)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    pmf = [math.comb(r, j) * q**j * (1.0 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + alpha * delta * 2 * m)


@pytest.mark.parametrize(("guesses", "expected"), [(10, 1.05187), (100, 3.49297), (1000, 5.80907)])
def test_all_guesses_right_under_pure_dp_has_the_closed_form(guesses: int, expected: float) -> None:
    bound = epsilon_lower_bound(
        canaries=guesses, guesses=guesses, correct=guesses, delta=0.0, confidence=0.95
    )
    assert bound == pytest.approx(_all_correct_pure_dp(guesses, 0.95), abs=2e-6)
    assert bound == pytest.approx(expected, abs=1e-4)


def test_many_right_guesses_give_a_large_bound_that_grows_with_the_canaries() -> None:
    bounds = [
        epsilon_lower_bound(canaries=m, guesses=m, correct=m, delta=1e-5, confidence=0.95)
        for m in (100, 1000, 2000)
    ]
    assert bounds[0] > 3.3 and bounds[1] > 5.7
    assert bounds[0] < bounds[1] < bounds[2]
    # a few wrong guesses cost a little, and a higher confidence asks for more evidence
    some_wrong = epsilon_lower_bound(
        canaries=1000, guesses=1000, correct=990, delta=1e-5, confidence=0.95
    )
    stricter = epsilon_lower_bound(
        canaries=1000, guesses=1000, correct=1000, delta=1e-5, confidence=0.99
    )
    assert 3.5 < some_wrong < bounds[1] and stricter < bounds[1]


@pytest.mark.parametrize(
    ("guesses", "correct"), [(1, 1), (10, 5), (100, 50), (1000, 510), (1000, 0)]
)
def test_guesses_no_better_than_a_coin_prove_nothing(guesses: int, correct: int) -> None:
    bound = epsilon_lower_bound(
        canaries=1000, guesses=guesses, correct=correct, delta=1e-5, confidence=0.95
    )
    assert bound == 0.0


def test_coin_flip_guessing_stays_near_zero() -> None:
    rng = random.Random(7)
    bounds = []
    for _ in range(40):
        members = [rng.random() < 0.5 for _ in range(500)]
        scores = [rng.random() for _ in range(500)]
        bounds.append(
            audit_scores(scores=scores, members=members, delta=1e-5, confidence=0.95).epsilon
        )
    assert max(bounds) < 0.3
    assert sum(bound == 0.0 for bound in bounds) >= 30


def test_p_value_at_epsilon_zero_is_the_fair_coin_tail() -> None:
    value = p_value(canaries=10, guesses=10, correct=8, epsilon=0.0, delta=0.0)
    assert value == pytest.approx(float(Fraction(45 + 10 + 1, 1024)), rel=1e-13)
    assert p_value(canaries=10, guesses=10, correct=0, epsilon=3.0, delta=0.0) == 1.0


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (60, 60, 50, 1.0, 1e-5),
        (60, 40, 31, 0.5, 1e-3),
        (60, 20, 20, 2.0, 0.0),
        (60, 60, 45, 3.0, 1e-2),
        (60, 30, 1, 0.2, 1e-5),
    ],
)
def test_p_value_matches_the_papers_formula(
    m: int, r: int, v: int, eps: float, delta: float
) -> None:
    expected = _paper_p_value(m, r, v, eps, delta)
    got = p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(expected, rel=1e-11, abs=1e-300)


def test_the_delta_term_counts_and_can_make_the_bound_vanish() -> None:
    without = p_value(canaries=1000, guesses=200, correct=150, epsilon=1.0, delta=0.0)
    with_delta = p_value(canaries=1000, guesses=200, correct=150, epsilon=1.0, delta=1e-5)
    assert with_delta > without

    def bound(canaries: int, delta: float) -> float:
        return epsilon_lower_bound(
            canaries=canaries, guesses=100, correct=70, delta=delta, confidence=0.95
        )

    assert 0.44 < bound(10_000, 1e-5) < bound(10_000, 0.0) == bound(100_000, 0.0)
    # 2 m delta = 2: already at epsilon 0, P[40 <= W < 70] / 30 of W ~ Binomial(100, 1/2)
    # (about 0.98 / 30) times 2 exceeds the 5% level
    assert bound(100_000, 1e-5) == 0.0


def test_tails_agree_with_scipy_at_a_thousand_guesses() -> None:
    stats = pytest.importorskip("scipy.stats")
    for v in (520, 600, 700, 900):
        for eps in (0.1, 0.5, 1.5, 3.0):
            q = 1.0 / (1.0 + math.exp(-eps))
            expected = float(stats.binom.sf(v - 1, 1000, q))
            got = p_value(canaries=1000, guesses=1000, correct=v, epsilon=eps, delta=0.0)
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-290)


def test_randomized_response_is_bounded_tightly_and_soundly() -> None:
    """Randomized response answering right with probability e^eps / (1 + e^eps) is exactly
    eps-DP: the bound exceeds eps in at most 5% of runs, and is not far below it."""
    eps = 1.0
    q = 1.0 / (1.0 + math.exp(-eps))
    rng = random.Random(11)
    bounds = []
    for _ in range(200):
        correct = sum(rng.random() < q for _ in range(400))
        bounds.append(
            epsilon_lower_bound(
                canaries=400, guesses=400, correct=correct, delta=0.0, confidence=0.95
            )
        )
    above = sum(bound > eps for bound in bounds)
    assert above <= 20  # expected at most 10 of 200
    assert 0.6 < statistics.median(bounds) < eps


def test_scores_become_guesses_at_both_ends_with_a_bonferroni_level() -> None:
    members = [i % 2 == 0 for i in range(200)]
    perfect = [1.0 if member else 0.0 for member in members]
    result = audit_scores(scores=perfect, members=members, delta=1e-5, confidence=0.95)
    assert result.guess_counts == guess_counts_for(200) == (10, 20, 40, 100, 200)
    assert (result.guesses, result.correct, result.canaries) == (200, 200, 200)
    level = 1.0 - 0.05 / 5
    assert result.epsilon == epsilon_lower_bound(
        canaries=200, guesses=200, correct=200, delta=1e-5, confidence=level
    )
    assert result.epsilon < epsilon_lower_bound(
        canaries=200, guesses=200, correct=200, delta=1e-5, confidence=0.95
    )
    backwards = audit_scores(
        scores=[-s for s in perfect], members=members, delta=1e-5, confidence=0.95
    )
    assert backwards.epsilon == 0.0


def test_only_the_ends_are_guessed() -> None:
    # canaries 0-1 score high and are in, 8-9 score low and are out; the middle is a mess
    members = [True, True, False, True, False, True, False, True, False, False]
    scores = [9.0, 8.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 1.0, 0.0]
    result = audit_scores(
        scores=scores, members=members, delta=0.0, confidence=0.95, guess_counts=[4]
    )
    assert (result.guesses, result.correct) == (4, 4)
    assert result.epsilon == epsilon_lower_bound(
        canaries=10, guesses=4, correct=4, delta=0.0, confidence=0.95
    )
    # ties keep canary order: of the tied middle, canaries 2 and 3 come first as "in" guesses
    odd = audit_scores(scores=scores, members=members, delta=0.0, confidence=0.95, guess_counts=[5])
    assert (odd.guesses, odd.correct) == (5, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: p_value(canaries=10, guesses=5, correct=6, epsilon=1.0, delta=0.0),
        lambda: p_value(canaries=4, guesses=5, correct=1, epsilon=1.0, delta=0.0),
        lambda: p_value(canaries=10, guesses=5, correct=1, epsilon=-1.0, delta=0.0),
        lambda: p_value(canaries=10, guesses=5, correct=1, epsilon=1.0, delta=1.0),
        lambda: epsilon_lower_bound(canaries=10, guesses=5, correct=1, delta=0, confidence=1.0),
        lambda: audit_scores(scores=[1.0], members=[True, False], delta=0.0, confidence=0.9),
        lambda: audit_scores(scores=[math.nan], members=[True], delta=0.0, confidence=0.9),
        lambda: audit_scores(
            scores=[1.0, 0.0], members=[True, False], delta=0, confidence=0.9, guess_counts=[3]
        ),
    ],
)
def test_impossible_inputs_are_refused(call: object) -> None:
    with pytest.raises(PrivacyError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.message
