"""A site's lifetime privacy cap and the pure check that keeps training under it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medfed.errors import BudgetExceededError, PrivacyError
from medfed.privacy.accounting import (
    AccountantName,
    DPSteps,
    check_accountant,
    check_delta,
    compute_epsilon,
)


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


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyTerms:
    """What a site's budget is kept under: the accountant, the delta and the epsilon cap.

    They are written into the site's signed ledger when it is created and at every change, so
    that its spend is recomputed with its own accountant, at its own delta, against its own cap.
    """

    accountant: AccountantName
    delta: float
    epsilon_cap: float

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        BudgetCap(epsilon=self.epsilon_cap, delta=self.delta)

    @property
    def cap(self) -> BudgetCap:
        return BudgetCap(epsilon=self.epsilon_cap, delta=self.delta)

    def describe(self) -> str:
        return f"cap {self.epsilon_cap:g} at delta {self.delta:g} ({self.accountant})"


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
    planned: DPSteps | Sequence[DPSteps],
    cap: BudgetCap,
    accountant: AccountantName,
) -> BudgetCheck:
    """Refuse ``planned`` (BudgetExceededError) if history plus plan would pass the cap.

    The total is one composition of history and plan at the cap's delta; the plan's own
    epsilon is computed only to make a refusal readable. ``planned`` may be several
    mechanisms (a round's Dice release and its DP-SGD steps), composed together.
    """
    plan = [planned] if isinstance(planned, DPSteps) else list(planned)
    spent = compute_epsilon(history=history, delta=cap.delta, accountant=accountant)
    would_reach = compute_epsilon(history=[*history, *plan], delta=cap.delta, accountant=accountant)
    if not would_reach <= cap.epsilon:
        planned_alone = compute_epsilon(history=plan, delta=cap.delta, accountant=accountant)
        described = "; ".join(
            f"{item.steps} steps at noise {item.noise_multiplier}, sample rate {item.sample_rate}"
            for item in plan
        )
        raise BudgetExceededError(
            f"planned training would pass the privacy cap: spent epsilon {spent:.4g}, "
            f"this plan alone {planned_alone:.4g} ({described}), together "
            f"{would_reach:.4g} > cap {cap.epsilon:g} (delta {cap.delta:g}, {accountant})",
            hint="train fewer epochs this round, raise noise_multiplier, or raise "
            "privacy.epsilon_cap if your data governance allows it",
        )
    return BudgetCheck(spent=spent, would_reach=would_reach, cap=cap, accountant=accountant)
