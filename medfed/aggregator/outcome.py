"""What a federation run reports: each site's record and the run's result and summary."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.numbers import finite_or_none
from medfed.privacy import DPSteps
from medfed.workspace import RunPaths


@dataclass
class SiteRecord:
    """What the run knows about one site (mutable: the loop updates it round by round)."""

    site_id: str
    status: str = "waiting"  # waiting, active, exhausted, declined, failed, offline
    rounds: int = 0
    num_patients: int = 0
    dice: float = math.nan
    last_loss: float = math.nan
    last_reason: str = ""
    last_plan: DPSteps | None = None

    def to_json(self, budget: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "status": self.status,
            "rounds": self.rounds,
            "patients": self.num_patients,
            "dice": finite_or_none(self.dice),
            "loss": finite_or_none(self.last_loss),
            "reason": self.last_reason,
            "epsilon_spent": None if budget is None else budget.get("epsilon_spent"),
            "epsilon_cap": None if budget is None else budget.get("epsilon_cap"),
            "delta": None if budget is None else budget.get("delta"),
        }


@dataclass(frozen=True)
class FederationResult:
    run_name: str
    status: str  # finished, stopped
    reason: str
    rounds_completed: int
    dice_initial: float
    dice_final: float
    sites: list[dict[str, Any]]
    directory: Path
    model: Path | None

    @property
    def paths(self) -> RunPaths:
        return RunPaths(directory=self.directory)

    def summary(self, budgets: Mapping[str, Any]) -> dict[str, Any]:
        """The run's summary as written to ``summary.json`` and sent with the last event."""
        return {
            "run_name": self.run_name,
            "status": self.status,
            "reason": self.reason,
            "rounds_completed": self.rounds_completed,
            "dice_initial": finite_or_none(self.dice_initial),
            "dice_final": finite_or_none(self.dice_final),
            "model": None if self.model is None else str(self.model),
            "sites": self.sites,
            "budgets": dict(budgets),
        }


def weighted_mean(values: Mapping[str, tuple[float, int]]) -> float:
    pairs = [(v, w) for v, w in values.values() if math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan
