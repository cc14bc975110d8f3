"""A site's privacy statement and its rows: what an auditor signs off, as data.

:func:`medfed.audit.report.build_report` fills these from the verified ledger copies;
:mod:`medfed.audit.contents` turns them into the report's document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from medfed.audit.accounting import DistributedEpsilons, Epsilons
from medfed.audit.findings import Finding
from medfed.numbers import finite_or_none
from medfed.privacy.accounting import conversion_of
from medfed.privacy.events import DECLARED_PUBLIC, ReleaseEntry
from medfed.privacy.ledger import ReservationState

MECHANISM: Final = (
    "DP-SGD (Abadi et al. 2016): each sampled patient's gradient (with its clipped training loss "
    "as one more coordinate) clipped to the clipping norm, Gaussian noise of standard deviation "
    "noise multiplier x clipping norm from a CSPRNG added to the sum (Opacus' optimiser); "
    "released counts and Dice through Gaussian mechanisms of their own, listed below"
)
PRIVACY_UNIT: Final = "patient (one image volume with its label; one crop per patient per step)"
ADJACENCY: Final = "add/remove one patient"
SAMPLING: Final = (
    "Poisson sampling of patients, rate q = batch size / released training count per step"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRow:
    """One reserved round of the ledger, with epsilon after it (cumulative, Opacus RDP)."""

    reservation: ReservationState
    epsilon_after: float

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self.reservation),
            "epsilon_after": finite_or_none(self.epsilon_after),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRow:
    """One number that left the site besides the weights, with what covers it."""

    release: ReleaseEntry

    @property
    def cover(self) -> str:
        entry = self.release
        if entry.mechanism == "gaussian":
            return (
                f"Gaussian mechanism, noise multiplier {entry.noise_multiplier:g} on sensitivity "
                f"{entry.sensitivity:g}: charged as one unsampled Gaussian step"
            )
        if entry.mechanism == "dp-sgd":
            return (
                f"a coordinate of the clipped DP-SGD vectors of reservation seq "
                f"{entry.reservation_seq} (per-patient loss bound {entry.sensitivity:g}): no "
                "extra cost"
            )
        return f"declared public by the site's policy: {entry.reason}"

    def to_json(self) -> dict[str, Any]:
        entry = self.release
        return {
            "seq": entry.seq,
            "run_id": entry.run_id,
            "round": entry.round,
            "quantity": entry.quantity,
            "values": dict(entry.values),
            "sealed": entry.sealed,
            "mechanism": entry.mechanism,
            "unit": entry.unit,
            "noise_multiplier": entry.noise_multiplier,
            "sensitivity": entry.sensitivity,
            "noise_std": entry.noise_std,
            "model_sha256": entry.model_sha256,
            "cover": self.cover,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteStatement:
    """The privacy statement of one site."""

    site_id: str
    key_id: str | None
    verified: bool
    delta: float | None
    cap: float | None
    accountant: str
    epsilon_spent: float | None
    epsilons: Epsilons | None
    rounds: tuple[RoundRow, ...]
    releases: tuple[ReleaseRow, ...]
    terms: tuple[str, ...]
    deltas: tuple[float, ...]
    accountants: tuple[str, ...]
    library_versions: tuple[tuple[str, tuple[int, ...]], ...]  # (versions text, seqs)
    dice: tuple[Mapping[str, Any], ...]
    models: tuple[Mapping[str, Any], ...]
    models_source: str
    findings: tuple[Finding, ...]
    site_ledger_entries: int | None
    # Only for a ledger with distributed-noise steps: the epsilon of each guarantee.
    distributed: DistributedEpsilons | None = None

    @property
    def spent(self) -> float | None:
        """Epsilon spent with the ledger's own accountant."""
        return self.epsilon_spent

    @property
    def remaining(self) -> float | None:
        if self.cap is None or self.spent is None:
            return None
        return max(self.cap - self.spent, 0.0)

    @property
    def runs(self) -> dict[str, list[int]]:
        """Run id -> rounds reserved in it, in ledger order."""
        found: dict[str, list[int]] = {}
        for row in self.rounds:
            found.setdefault(row.reservation.run_id, []).append(row.reservation.round)
        return found

    def distinct(self, name: str) -> list[Any]:
        """Distinct values of one reservation field, in first-seen order."""
        values: list[Any] = []
        for row in self.rounds:
            value = getattr(row.reservation, name)
            if value not in values:
                values.append(value)
        return values

    def to_json(self) -> dict[str, Any]:
        data = {
            "site_id": self.site_id,
            "key_id": self.key_id,
            "ledger_verified": self.verified,
            "mechanism": MECHANISM,
            "privacy_unit": PRIVACY_UNIT,
            "adjacency": ADJACENCY,
            "sampling": SAMPLING,
            "sample_rates": self.distinct("sample_rate"),
            "released_patient_counts": [
                {"seq": row.release.seq, **_shown(row.release)}
                for row in self.releases
                if row.release.quantity == "patients"
            ],
            "noise_multipliers": self.distinct("noise_multiplier"),
            "clipping_norms": self.distinct("max_grad_norm"),
            "steps_total": sum(row.reservation.counted_steps for row in self.rounds),
            "steps_per_round": [
                {
                    "run_id": row.reservation.run_id,
                    "round": row.reservation.round,
                    "reserved": row.reservation.reserved_steps,
                    "committed": row.reservation.committed_steps,
                }
                for row in self.rounds
            ],
            "delta": self.delta,
            "ledger_deltas": list(self.deltas),
            "ledger_accountants": {name: conversion_of(name) for name in self.accountants},
            "terms": list(self.terms),
            "accountant": self.accountant,
            "epsilon": None if self.epsilons is None else self.epsilons.to_json(),
            "epsilon_spent": finite_or_none(self.spent),
            "epsilon_cap": self.cap,
            "epsilon_remaining": finite_or_none(self.remaining),
            "library_versions": [
                {"versions": text, "seqs": list(seqs)} for text, seqs in self.library_versions
            ],
            "rounds_participated": len(self.rounds),
            "runs": self.runs,
            "rounds": [row.to_json() for row in self.rounds],
            "releases": [row.to_json() for row in self.releases],
            "declared_public": dict(DECLARED_PUBLIC),
            "dice_vs_epsilon": [dict(point) for point in self.dice],
            "models": [dict(model) for model in self.models],
            "models_source": self.models_source,
            "site_ledger_entries": self.site_ledger_entries,
            "findings": [finding.to_json() for finding in self.findings],
        }
        if self.distributed is not None:
            data["distributed_epsilon"] = self.distributed.to_json()
        return data


def _shown(entry: ReleaseEntry) -> dict[str, Any]:
    """A release's values, or the commitment that stands for them when they are sealed."""
    return dict(entry.values) if entry.sealed is None else {"sealed": entry.sealed}
