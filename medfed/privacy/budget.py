"""A site's lifetime privacy cap and the pure check that keeps training under it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medfed.errors import BudgetExceededError, PrivacyError
from medfed.privacy.accounting import AccountantName, DPSteps, check_delta, compute_epsilon


@dataclass(frozen=True, slots=True)
class BudgetCap:
    """The most privacy a site agreed to spend over the life of its data: (epsilon, delta)."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if (
            not isinstance(self.epsilon, int | float)
            or isinstance(self.epsilon, bool)
            or not 0.0 < self.epsilon < math.inf
        ):
            raise PrivacyError(
                f"epsilon cap must be a finite number > 0, got {self.epsilon!r}",
                hint="set privacy.epsilon_cap in the site config, e.g. 8.0",
            )
        check_delta(self.delta)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Epsilon spent so far against the cap, under one accountant."""

    spent: float
    cap: BudgetCap
    accountant: AccountantName

    @property
    def remaining(self) -> float:
        """Epsilon left before the cap (0 when spent or over)."""
        return max(self.cap.epsilon - self.spent, 0.0)

    @property
    def exhausted(self) -> bool:
        """True when nothing is left to spend."""
        return self.spent >= self.cap.epsilon


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """The numbers behind an accepted plan: epsilon spent before it and reached with it."""

    spent: float
    would_reach: float
    cap: BudgetCap
    accountant: AccountantName


def budget_status(
    *, history: Sequence[DPSteps], cap: BudgetCap, accountant: AccountantName
) -> BudgetStatus:
    """Spent epsilon of ``history`` at the cap's delta."""
    spent = compute_epsilon(history=history, delta=cap.delta, accountant=accountant)
    return BudgetStatus(spent=spent, cap=cap, accountant=accountant)


def check_budget(
    *,
    history: Sequence[DPSteps],
    planned: DPSteps,
    cap: BudgetCap,
    accountant: AccountantName,
) -> BudgetCheck:
    """Refuse ``planned`` (BudgetExceededError) if history plus plan would pass the cap.

    The total is one composition of history and plan at the cap's delta; the plan's own
    epsilon is computed only to make a refusal readable.
    """
    spent = compute_epsilon(history=history, delta=cap.delta, accountant=accountant)
    would_reach = compute_epsilon(
        history=[*history, planned], delta=cap.delta, accountant=accountant
    )
    if not would_reach <= cap.epsilon:
        planned_alone = compute_epsilon(history=[planned], delta=cap.delta, accountant=accountant)
        raise BudgetExceededError(
            f"planned training would pass the privacy cap: spent epsilon {spent:.4g}, "
            f"this plan alone {planned_alone:.4g} ({planned.steps} steps at noise "
            f"{planned.noise_multiplier}, sample rate {planned.sample_rate}), together "
            f"{would_reach:.4g} > cap {cap.epsilon:g} (delta {cap.delta:g}, {accountant})",
            hint="train fewer epochs this round, raise noise_multiplier, or raise "
            "privacy.epsilon_cap if your data governance allows it",
        )
    return BudgetCheck(spent=spent, would_reach=would_reach, cap=cap, accountant=accountant)
