"""The epsilon lower bound of a one-run privacy audit (Steinke, Nasr and Jagielski 2023).

Reference: T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846. Each of ``m`` canaries is included in the training data
independently with probability 1/2; after the run an auditor guesses "in" or "out" for ``r`` of
them (abstaining on the others) and ``v`` of its guesses are correct. The paper's main theorem
(Section 3) bounds what an (epsilon, delta)-DP run can let the auditor achieve: with
``W ~ Binomial(r, e^eps / (1 + e^eps))``, the number of correct guesses exceeds ``v`` with
probability at most

    P[W >= v]  +  2 m delta * max_{1 <= i <= v} P[v - i <= W < v] / i        (pure DP: delta = 0)

:func:`p_value` is that bound, computed as in the paper's Appendix D (``p_value_DP_audit``);
:func:`epsilon_lower_bound` is the largest epsilon it rejects at the given confidence
(``get_eps_audit``), found by bisection because the p-value grows with epsilon. Observing ``v``
correct guesses then proves, with that confidence, that the run was *not* (eps, delta)-DP for any
eps below the bound.

The binomial terms are computed in log space with :func:`math.lgamma` and summed by log-sum-exp,
so thousands of canaries need neither scipy nor big integers. :func:`audit_scores` turns the
auditor's membership scores into guesses: for each guess count of a small grid fixed in advance,
the highest-scoring half are guessed "in" and the lowest-scoring half "out"; each count is
tested at ``(1 - confidence) / len(grid)`` (Bonferroni), so the largest of their bounds still
holds at ``confidence``. Pure computation: no I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from medfed.errors import PrivacyError

# The result document `medfed audit canary` writes and the auditor's report reads.
RESULT_SCHEMA: Final = "medfed.canary-audit/1"

#: Guess counts tried, as fractions of the canaries (each at least one guess). Small counts win
#: when only the canaries the run memorised stand out; all of them when every canary does.
GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
#: The bisection stops when the bracket is this narrow (in epsilon).
EPSILON_TOLERANCE = 1e-6
_EPSILON_CEILING = 200.0  # far beyond any bound a few thousand guesses can prove


@dataclass(frozen=True, slots=True)
class AuditBound:
    """The audit's conclusion: ``epsilon`` is a lower bound that holds at ``confidence``.

    ``guesses`` and ``correct`` are those of the guess count whose bound was the largest
    (``guess_counts`` lists every count tried, each at the Bonferroni-corrected level).
    """

    epsilon: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    guess_counts: tuple[int, ...]


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    values = (canaries, guesses, correct)
    if any(isinstance(n, bool) or not isinstance(n, int) for n in values) or not (
        0 <= correct <= guesses <= canaries
    ):
        raise PrivacyError(
            f"a one-run audit needs 0 <= correct <= guesses <= canaries, got correct={correct!r}, "
            f"guesses={guesses!r}, canaries={canaries!r}",
            hint="count only the canaries the auditor guessed for, and only its right guesses",
        )


def _check_delta(delta: float) -> None:
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not 0.0 <= delta < 1.0:
        raise PrivacyError(
            f"the audited delta must be in [0, 1), got {delta!r}",
            hint="audit at the delta the run's ledger is kept under, e.g. 1e-5",
        )


def _check_confidence(confidence: float) -> None:
    if (
        not isinstance(confidence, int | float)
        or isinstance(confidence, bool)
        or not 0.0 < confidence < 1.0
    ):
        raise PrivacyError(
            f"the audit's confidence must be in (0, 1), got {confidence!r}",
            hint="use e.g. 0.95 (the bound then holds with probability 95%)",
        )


def _log_sum_exp(values: Sequence[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(value - top) for value in values))


def _log_pmfs(trials: int, epsilon: float) -> list[float]:
    """``log P[W = j]`` for ``j = 0..trials``, ``W ~ Binomial(trials, e^eps / (1 + e^eps))``."""
    # log q and log(1 - q) without cancellation, however large epsilon is
    log_q = -math.log1p(math.exp(-epsilon))
    log_not_q = -epsilon + log_q
    log_n = math.lgamma(trials + 1)
    return [
        log_n
        - math.lgamma(j + 1)
        - math.lgamma(trials - j + 1)
        + j * log_q
        + (trials - j) * log_not_q
        for j in range(trials + 1)
    ]


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability that an (epsilon, delta)-DP run lets ``correct`` or more guesses be right.

    The paper's bound for ``m = canaries``, ``r = guesses``, ``v = correct`` (see the module
    docstring), capped at 1. A small value rejects "the run is (epsilon, delta)-DP".
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if not isinstance(epsilon, int | float) or not 0.0 <= epsilon < math.inf:
        raise PrivacyError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if correct == 0:
        return 1.0
    log_pmf = _log_pmfs(guesses, float(epsilon))
    tail = math.exp(_log_sum_exp(log_pmf[correct:]))  # P[W >= v]
    if delta == 0.0:
        return min(1.0, tail)
    # max over i of P[v - i <= W < v] / i, summing the pmf downwards from v - 1
    worst = 0.0
    below = 0.0
    for i in range(1, correct + 1):
        below += math.exp(log_pmf[correct - i])
        worst = max(worst, below / i)
    return min(1.0, tail + worst * delta * 2 * canaries)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float
) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` reject.

    The run is then, with probability ``confidence``, not (eps, delta)-DP for any eps below the
    returned value. 0.0 when even epsilon 0 is not rejected (as for guesses no better than a
    coin). Bisection to :data:`EPSILON_TOLERANCE`, always returning an epsilon found rejected.
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    _check_confidence(confidence)
    level = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        value = p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
        )
        return value < level

    if guesses == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2.0 * high
        if high > _EPSILON_CEILING:
            return low
    while high - low > EPSILON_TOLERANCE:
        middle = (low + high) / 2.0
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def guess_counts_for(canaries: int) -> tuple[int, ...]:
    """The guess counts :func:`audit_scores` tries for ``canaries`` canaries (distinct, sorted)."""
    return tuple(sorted({max(1, round(f * canaries)) for f in GUESS_FRACTIONS}))


def audit_scores(
    *,
    scores: Sequence[float],
    members: Sequence[bool],
    delta: float,
    confidence: float,
    guess_counts: Sequence[int] | None = None,
) -> AuditBound:
    """The epsilon lower bound from one membership score per canary (higher: more likely in).

    ``members[i]`` says whether canary ``i`` was really included. For each guess count ``k``
    the ``ceil(k / 2)`` highest scores are guessed "in" and the ``floor(k / 2)`` lowest "out";
    equal scores keep the canaries' order, which the inclusion draw does not depend on. Each
    count is tested at level ``(1 - confidence) / len(guess_counts)``.
    """
    m = len(scores)
    if m == 0 or len(members) != m:
        raise PrivacyError(
            f"an audit needs one score per canary and at least one canary, got {m} scores "
            f"for {len(members)} canaries",
            hint="score every canary of the run, included or not",
        )
    if any(not math.isfinite(score) for score in scores):
        raise PrivacyError(
            "a canary's membership score is not finite",
            hint="the audit run diverged; rerun it, or lower the learning rate",
        )
    _check_delta(delta)
    _check_confidence(confidence)
    counts = tuple(sorted(set(guess_counts))) if guess_counts else guess_counts_for(m)
    if any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m for k in counts):
        raise PrivacyError(
            f"guess counts must be between 1 and the {m} canaries, got {list(counts)}",
            hint="leave guess_counts unset for the default grid",
        )
    order = sorted(range(m), key=lambda i: -scores[i])  # stable: ties keep canary order
    per_test = 1.0 - (1.0 - confidence) / len(counts)
    best: tuple[float, int, int] | None = None
    for k in counts:
        top, bottom = order[: (k + 1) // 2], order[m - k // 2 :] if k // 2 else []
        correct = sum(1 for i in top if members[i]) + sum(1 for i in bottom if not members[i])
        bound = epsilon_lower_bound(
            canaries=m, guesses=k, correct=correct, delta=delta, confidence=per_test
        )
        if best is None or bound > best[0]:
            best = (bound, k, correct)
    assert best is not None
    epsilon, guesses, correct = best
    return AuditBound(
        epsilon=epsilon,
        confidence=confidence,
        delta=float(delta),
        canaries=m,
        guesses=guesses,
        correct=correct,
        guess_counts=counts,
    )
