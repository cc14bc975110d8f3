"""What the aggregator learns of one site in one round: read from the site's verified ledger.

A site's reply carries its weights and its new ledger lines, nothing else; the patient count
an update is weighted by, the training loss, the validation Dice and the plan of the round
are release and reservation entries, signed by the site and verified by the budget tracker
before anything here reads them. Each value keeps the mechanism that released it, which the
events, MLflow and the audit report show beside the number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medfed.privacy import DPSteps, LedgerReport, ReleaseEntry
from medfed.run_events import ReleaseNote


@dataclass(frozen=True)
class Released:
    """One released value and how it was released (mechanism, noise, ledger entry)."""

    value: float
    note: ReleaseNote

    @classmethod
    def of(cls, entry: ReleaseEntry, name: str) -> Released:
        """The entry's value ``name``; NaN for a sealed release, whose values stayed at the site."""
        return cls(
            value=math.nan if entry.sealed is not None else float(entry.values[name]),
            note=ReleaseNote(mechanism=entry.mechanism, noise_std=entry.noise_std, seq=entry.seq),
        )


@dataclass(frozen=True)
class RoundRecord:
    """One site's round as its ledger records it.

    ``patients`` is the site's latest released training count (the FedAvg weight); ``plan``
    the round's reserved DP-SGD steps; ``committed`` whether the steps were committed, without
    which the update is covered by no privacy spend and must not be used.
    """

    patients: Released | None
    loss: Released | None
    dice: Released | None
    plan: DPSteps | None
    committed: bool


def round_record(
    report: LedgerReport, *, run_id: str, round: int, model_sha256: str
) -> RoundRecord:
    """The entries of round ``round`` of ``run_id``; Dice only of the model ``model_sha256``."""
    reservations = [r for r in report.runs(run_id) if r.round == round]
    committed = [r for r in reservations if r.committed]
    latest = committed[-1] if committed else (reservations[-1] if reservations else None)
    losses = report.releases_of(quantity="train_loss", run_id=run_id, round=round)
    return RoundRecord(
        patients=_value(report.latest_release("patients"), "train"),
        loss=_value(losses[-1] if losses else None, "loss"),
        dice=model_dice(report, run_id=run_id, model_sha256=model_sha256),
        plan=None if latest is None else latest.planned_steps,
        committed=bool(committed),
    )


def model_dice(report: LedgerReport, *, run_id: str, model_sha256: str) -> Released | None:
    """The validation Dice the site released for one model of a run, if it released one."""
    for entry in reversed(report.releases_of(quantity="validation_dice", run_id=run_id)):
        if entry.model_sha256 == model_sha256:
            return Released.of(entry, "dice")
    return None


def finite_value(released: Released | None) -> float:
    return math.nan if released is None else released.value


def _value(entry: ReleaseEntry | None, name: str) -> Released | None:
    return None if entry is None else Released.of(entry, name)
