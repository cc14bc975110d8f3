"""``build_report``: per site, the privacy statement an auditor signs off, with its evidence.

Each site's statement is read from the aggregator's verified copy of its ledger (the mechanism,
the privacy unit and adjacency are medfed's design and hold for every entry; the sampling rate,
noise, clipping, steps, delta, accountant and library versions are the ledger's own), with the
epsilon of each library, the cap and what remains, the rounds and runs the site took part in,
epsilon after each round against the cap, Dice against epsilon from the runs' events, the
models trained on the site's data, and the verification's findings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.audit.accounting import ACCOUNTANT_DESCRIPTIONS, Epsilons, cumulative_opacus_rdp
from medfed.audit.findings import Finding, number
from medfed.audit.mlflow_store import MlflowStore, resolve_target
from medfed.audit.sources import RunRecord, read_runs
from medfed.audit.verify import AuditResult, SiteAudit, verify_workspace
from medfed.privacy.accounting import conversion_of
from medfed.privacy.events import DECLARED_PUBLIC, ReleaseEntry, ReserveEntry, TermsEntry
from medfed.privacy.ledger import LedgerReport, ReservationState

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
        return {**dataclasses.asdict(self.reservation), "epsilon_after": number(self.epsilon_after)}


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
        return {
            "site_id": self.site_id,
            "key_id": self.key_id,
            "ledger_verified": self.verified,
            "mechanism": MECHANISM,
            "privacy_unit": PRIVACY_UNIT,
            "adjacency": ADJACENCY,
            "sampling": SAMPLING,
            "sample_rates": self.distinct("sample_rate"),
            "released_patient_counts": [
                {"seq": row.release.seq, **dict(row.release.values)}
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
            "epsilon_spent": number(self.spent),
            "epsilon_cap": self.cap,
            "epsilon_remaining": number(self.remaining),
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


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """The whole report: a statement per site and the verification it rests on."""

    generated_at: str
    workspace: Path
    verification: AuditResult
    sites: tuple[SiteStatement, ...]

    def site(self, site_id: str) -> SiteStatement:
        for site in self.sites:
            if site.site_id == site_id:
                return site
        raise KeyError(site_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "report": "medfed privacy audit",
            "generated_at": self.generated_at,
            "workspace": str(self.workspace),
            "verdict": self.verification.verdict,
            "accountants": dict(ACCOUNTANT_DESCRIPTIONS),
            "sites": {site.site_id: site.to_json() for site in self.sites},
            "verification": self.verification.to_json(),
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page (inline CSS and SVG plots; no external resources)."""
        from medfed.audit.render import render_html

        return render_html(report=self)

    def write_pdf(self, path: Path) -> None:
        """A PDF of text pages and plots (needs matplotlib; ConfigError without it)."""
        from medfed.audit.render import write_pdf

        write_pdf(report=self, path=Path(path))


def build_report(
    *,
    workspace: Path,
    run_name: str | None = None,
    site_ledgers: Mapping[str, Path] | None = None,
    tracking_uri: str | None = None,
    mlflow_run: str | None = None,
) -> AuditReport:
    """Verify the workspace and build every registered site's statement from what verified."""
    result = verify_workspace(
        workspace=workspace,
        run_name=run_name,
        site_ledgers=site_ledgers,
        tracking_uri=tracking_uri,
        mlflow_run=mlflow_run,
    )
    runs = read_runs(workspace_root=result.workspace, run_name=run_name)
    models = _ModelSource(runs, tracking_uri=tracking_uri, mlflow_run=mlflow_run)
    statements = tuple(_statement(site, result, runs, models) for site in result.sites)
    return AuditReport(
        generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        workspace=result.workspace,
        verification=result,
        sites=statements,
    )


def _statement(
    site: SiteAudit, result: AuditResult, runs: list[RunRecord], models: _ModelSource
) -> SiteStatement:
    rows: list[RoundRow] = []
    versions: dict[str, list[int]] = {}
    copy = site.copy
    if copy is not None and site.epsilons is not None:
        charges = copy.charges
        curve = cumulative_opacus_rdp(
            history=[charge.steps for charge in charges], delta=site.epsilons.delta
        )
        after = {charge.seq: epsilon for charge, epsilon in zip(charges, curve, strict=True)}
        rows = [
            RoundRow(reservation=state, epsilon_after=after[state.seq])
            for state in copy.reservations
        ]
        for entry in copy.entries:
            if isinstance(entry, ReserveEntry):
                text = ", ".join(f"{k} {v}" for k, v in sorted(entry.library_versions.items()))
                versions.setdefault(text, []).append(entry.seq)
    dice = tuple(
        {
            "run_name": run.name,
            "round": event.get("round"),
            "dice_before": event.get("dice_before"),
            "epsilon_spent": event.get("epsilon_spent"),
        }
        for run in runs
        for event in run.site_updates()
        if event.get("site") == site.site_id
    )
    found, source = models.for_site(site.site_id)
    return SiteStatement(
        site_id=site.site_id,
        key_id=site.key_id,
        verified=site.copy is not None,
        delta=None if site.epsilons is None else site.epsilons.delta,
        cap=None if site.cap is None else site.cap.epsilon,
        accountant=site.accountant,
        epsilon_spent=site.spent,
        epsilons=site.epsilons,
        rounds=tuple(rows),
        releases=tuple(ReleaseRow(release=r) for r in (copy.releases if copy else ())),
        terms=tuple(change.describe() for change in (copy.terms_changes if copy else ())),
        deltas=_deltas(copy),
        accountants=_accountants(copy),
        library_versions=tuple((text, tuple(seqs)) for text, seqs in versions.items()),
        dice=dice,
        models=tuple(found),
        models_source=source,
        findings=tuple(f for f in result.findings if f.site_id == site.site_id),
        site_ledger_entries=None if site.site_ledger is None else len(site.site_ledger.entries),
    )


def _deltas(copy: LedgerReport | None) -> tuple[float, ...]:
    """Every delta the ledger was kept under, in order (format-1 reservations' included)."""
    return _distinct(copy, "delta")


def _accountants(copy: LedgerReport | None) -> tuple[str, ...]:
    return _distinct(copy, "accountant")


def _distinct(copy: LedgerReport | None, name: str) -> tuple[Any, ...]:
    """Distinct values of a terms field, from terms entries and format-1 reservations."""
    found: list[Any] = []
    for entry in () if copy is None else copy.entries:
        if isinstance(entry, TermsEntry):
            value = getattr(entry, name)
        elif isinstance(entry, ReserveEntry):
            value = getattr(entry, f"legacy_{name}")
        else:
            continue
        if value is not None and value not in found:
            found.append(value)
    return tuple(found)


class _ModelSource:
    """Models trained on a site's data: MLflow's registry, else the runs' global checkpoints."""

    def __init__(
        self, runs: list[RunRecord], *, tracking_uri: str | None, mlflow_run: str | None
    ) -> None:
        self._runs = runs
        self._registry: dict[str, list[Any]] = {}
        self._notes: list[str] = []
        for run in runs:
            target, why = resolve_target(run=run, tracking_uri=tracking_uri, mlflow_run=mlflow_run)
            if target is None:
                self._notes.append(why)
                continue
            try:
                store = MlflowStore(tracking_uri=target.tracking_uri)
                self._registry[run.name] = store.model_versions(f"medfed-{run.name}")
            except Exception as exc:  # any MLflow failure: fall back to checkpoints
                self._notes.append(f"MLflow registry unreadable: {type(exc).__name__}")

    def for_site(self, site_id: str) -> tuple[list[dict[str, Any]], str]:
        found: list[dict[str, Any]] = []
        sources: set[str] = set()
        for run in self._runs:
            versions = self._registry.get(run.name)
            if versions:
                sources.add("MLflow model registry")
                found += [
                    {"run_name": run.name, **v.to_json()} for v in versions if site_id in v.sites
                ]
                continue
            sources.add("run checkpoints (global/round-NNNN)")
            found += _checkpoints(run, site_id)
        return found, " + ".join(sorted(sources)) or "no runs"


def _checkpoints(run: RunRecord, site_id: str) -> list[dict[str, Any]]:
    """Global models of ``run`` from the first round that aggregated an update of ``site_id``.

    Every later global model builds on that one, so it is trained on the site's data too;
    ``direct`` says whether the round's own aggregation held an update of the site.
    """
    final = None if run.summary is None else run.summary.get("model")
    rounds = []
    for directory in sorted((run.directory / "global").glob("round-*")):
        try:
            meta = json.loads((directory / "model.json").read_text(encoding="utf-8"))
            metadata = meta["metadata"]
            sites = metadata.get("sites", [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        direct = isinstance(sites, list) and site_id in sites
        rounds.append((directory, metadata.get("round"), direct, meta.get("weights") or {}))
    first = next((index for index, item in enumerate(rounds) if item[2]), None)
    return [
        {
            "run_name": run.name,
            "round": round_,
            "path": str(directory),
            "direct": direct,
            "final": final is not None and Path(str(final)) == directory,
            "sha256": weights.get("sha256") if isinstance(weights, dict) else None,
        }
        for directory, round_, direct, weights in ([] if first is None else rounds[first:])
    ]
