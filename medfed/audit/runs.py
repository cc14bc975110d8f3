"""A run's reported epsilons against the ledger: ``summary.json`` and MLflow, per site.

A run's summary is written at its end, and later runs add entries to the same ledgers; so each
site's reported epsilon is compared with the epsilon of the *prefix* of the
aggregator's copy that existed at that run's end: as many entries as the summary's
``budgets.sites.<site>.entries``, ending in its ``last_hash``, with the accountant and at the
delta the ledger names there. MLflow's last logged ``epsilon_spent`` of the site's child run
must equal the same number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.audit.findings import Check, Collector, Finding, fmt, relative_difference
from medfed.audit.mlflow_store import MlflowStore, resolve_target
from medfed.audit.sources import RunRecord
from medfed.errors import LedgerError
from medfed.numbers import as_float, finite_or_none
from medfed.privacy.accounting import compute_epsilon
from medfed.privacy.events import line_hash
from medfed.privacy.ledger import LedgerReport, verify_ledger_bytes

# Reported and recomputed epsilon must agree this closely (relative).
REPORTED_TOLERANCE: Final = 1e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEpsilon:
    """One site's epsilon at the end of one run: as recomputed and as reported."""

    run_name: str
    site_id: str
    entries: int
    delta: float
    recomputed: float | None
    summary: float | None
    mlflow: float | None
    mlflow_step: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "site_id": self.site_id,
            "entries": self.entries,
            "delta": self.delta,
            "recomputed_opacus_rdp": finite_or_none(self.recomputed),
            "summary_epsilon_spent": finite_or_none(self.summary),
            "mlflow_epsilon_spent": finite_or_none(self.mlflow),
            "mlflow_step": self.mlflow_step,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedCopy:
    """The aggregator's copy of one site's ledger, as verified: bytes, report and key."""

    data: bytes
    report: LedgerReport
    public_key: Ed25519PublicKey


def audit_run(
    *,
    run: RunRecord,
    copies: Mapping[str, VerifiedCopy],
    tracking_uri: str | None,
    mlflow_run: str | None,
    collect: Collector,
) -> list[RunEpsilon]:
    """Check every site of ``run`` whose ledger copy verified; each site's numbers."""
    epsilons: list[RunEpsilon] = []
    if run.summary is None:
        collect.checks.append(
            Check(
                site_id=None,
                name=f"run {run.name}: summary",
                status="skipped",
                detail="no summary.json (the run is still going or stopped without one)",
            )
        )
        return epsilons
    mlflow = _MlflowSide.open(
        run, tracking_uri=tracking_uri, mlflow_run=mlflow_run, collect=collect
    )
    for site_id in run.site_ids():
        budget = run.budget(site_id)
        if budget is None or site_id not in copies:
            why = "no budget in the summary" if budget is None else "its ledger copy did not verify"
            collect.checks.append(
                Check(
                    site_id=site_id,
                    name=f"run {run.name}: summary epsilon",
                    status="skipped",
                    detail=why,
                )
            )
            continue
        prefix = _prefix(run, site_id, budget, copies[site_id], collect)
        if prefix is None:
            continue
        delta = as_float(budget.get("delta"))
        if delta is None or not 0.0 < delta < 1.0:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="summary",
                    source=f"runs/{run.name}/summary.json",
                    problem=f"budgets.sites.{site_id}.delta is not a valid delta: "
                    f"{budget.get('delta')!r}",
                )
            )
            continue
        terms = prefix.terms
        if terms is not None and terms.delta != delta:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="summary",
                    source=f"runs/{run.name}/summary.json",
                    problem=f"budgets.sites.{site_id}.delta is {delta:g} but the site's ledger "
                    f"names delta {terms.delta:g} at that run's end",
                )
            )
            delta = terms.delta
        accountant = "rdp" if terms is None else terms.accountant
        recomputed = compute_epsilon(history=prefix.history, delta=delta, accountant=accountant)
        summary = _summary_epsilon(run, site_id, budget, recomputed, collect)
        step, logged = mlflow.check(site_id, recomputed, prefix, collect)
        epsilons.append(
            RunEpsilon(
                run_name=run.name,
                site_id=site_id,
                entries=len(prefix.entries),
                delta=delta,
                recomputed=recomputed,
                summary=summary,
                mlflow=logged,
                mlflow_step=step,
            )
        )
    return epsilons


def _prefix(
    run: RunRecord,
    site_id: str,
    budget: Mapping[str, Any],
    copy: VerifiedCopy,
    collect: Collector,
) -> LedgerReport | None:
    """The copy's first ``entries`` entries, checked against the summary's ``last_hash``."""
    name = f"run {run.name}: summary epsilon"
    count = budget.get("entries")
    held = len(copy.report.entries)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        collect.findings.append(
            Finding(site_id=site_id, check="summary", problem=f"{name}: no entry count")
        )
        return None
    if count > held:
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="summary",
                source=f"runs/{run.name}/summary.json",
                problem=f"run {run.name!r} counted {count} ledger entries but the aggregator's "
                f"copy holds {held}: entries were removed from the copy",
            )
        )
        return None
    lines = copy.data.split(b"\n")[:count]
    expected = budget.get("last_hash")
    if count and isinstance(expected, str) and line_hash(lines[-1]) != expected:
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="summary",
                source=f"runs/{run.name}/summary.json",
                line=count,
                seq=count - 1,
                problem=f"run {run.name!r} ended on a different ledger entry (last_hash "
                f"{expected[:12]}...) than the copy holds at that place: the copy was rewritten",
            )
        )
        return None
    try:
        return verify_ledger_bytes(
            b"".join(line + b"\n" for line in lines),
            public_key=copy.public_key,
            site_id=site_id,
            source=str(copy.report.path),
        )
    except LedgerError as exc:  # cannot happen for a prefix of a verified copy
        collect.findings.append(Finding(site_id=site_id, check="summary", problem=exc.message))
        return None


def _summary_epsilon(
    run: RunRecord,
    site_id: str,
    budget: Mapping[str, Any],
    recomputed: float,
    collect: Collector,
) -> float | None:
    row = run.summary_row(site_id) or {}
    values = {
        "sites[].epsilon_spent": row.get("epsilon_spent", budget.get("epsilon_spent")),
        "budgets.sites.epsilon_spent": budget.get("epsilon_spent"),
    }
    reported: float | None = None
    for where, value in values.items():
        # JSON has no infinity: an unbounded epsilon is written as null.
        found = math.inf if value is None else as_float(value)
        found = math.nan if found is None else found
        reported = found if reported is None else reported
        if math.isnan(found) or relative_difference(found, recomputed) > REPORTED_TOLERANCE:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="summary",
                    source=f"runs/{run.name}/summary.json",
                    problem=f"{where} is {value!r} but the ledger copy's first "
                    f"{budget.get('entries')} entries give {fmt(recomputed, 10)} (the ledger's "
                    f"accountant at delta {budget.get('delta')})",
                )
            )
            return found
    collect.checks.append(
        Check(
            site_id=site_id,
            name=f"run {run.name}: summary epsilon",
            status="pass",
            detail=f"{fmt(reported)} = recomputed {fmt(recomputed)} over the first "
            f"{budget.get('entries')} entries",
        )
    )
    return reported


@dataclass(slots=True)
class _MlflowSide:
    """The run's MLflow store and child runs, or why MLflow is not checked."""

    run: RunRecord
    store: MlflowStore | None
    site_runs: dict[str, str]
    parent_run_id: str | None = None
    tables: dict[str, tuple[int, float]] | None = None  # read on the first site without a run

    @classmethod
    def open(
        cls,
        run: RunRecord,
        *,
        tracking_uri: str | None,
        mlflow_run: str | None,
        collect: Collector,
    ) -> _MlflowSide:
        target, why = resolve_target(run=run, tracking_uri=tracking_uri, mlflow_run=mlflow_run)
        name = f"run {run.name}: MLflow epsilon"
        if target is None:
            collect.checks.append(Check(site_id=None, name=name, status="skipped", detail=why))
            return cls(run=run, store=None, site_runs={})
        try:
            store = MlflowStore(tracking_uri=target.tracking_uri)
            site_runs = store.site_runs(target)
        except Exception as exc:  # MLflow raises many kinds; each means "cannot read"
            collect.findings.append(
                Finding(
                    site_id=None,
                    check="mlflow",
                    source=target.tracking_uri,
                    problem=f"cannot read run {run.name!r} from MLflow: {_short(exc)}",
                )
            )
            return cls(run=run, store=None, site_runs={})
        return cls(run=run, store=store, site_runs=site_runs, parent_run_id=target.parent_run_id)

    def _table_value(self, site_id: str) -> tuple[int, float] | None:
        """The site's last value in the simulation's round tables (none in a deployment)."""
        if self.store is None or self.parent_run_id is None:
            return None
        if self.tables is None:
            self.tables = self.store.table_values(self.parent_run_id)
        return self.tables.get(site_id)

    def check(
        self, site_id: str, recomputed: float, prefix: LedgerReport, collect: Collector
    ) -> tuple[int | None, float | None]:
        if self.store is None:
            return None, None
        name = f"run {self.run.name}: MLflow epsilon"
        trained = any(r.run_id == self.run.name for r in prefix.reservations)
        run_id = self.site_runs.get(site_id)
        where = f"run {run_id}"
        try:
            if run_id is not None:
                last = self.store.last_value(run_id)
            else:
                # A simulation's site without a child run: its row in the round tables.
                last = self._table_value(site_id)
                where = f"run {self.parent_run_id} site_metrics tables"
        except Exception as exc:  # as above: any MLflow failure is "cannot read"
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="mlflow",
                    source=self.store.tracking_uri,
                    problem=f"cannot read epsilon_spent of {where}: {_short(exc)}",
                )
            )
            return None, None
        if last is None:
            if trained:
                collect.findings.append(
                    Finding(
                        site_id=site_id,
                        check="mlflow",
                        source=self.store.tracking_uri,
                        problem=f"MLflow has no epsilon_spent of the site for run "
                        f"{self.run.name!r} (no child run or site table row, or nothing "
                        "logged) although its ledger records rounds of that run",
                    )
                )
            else:
                collect.checks.append(
                    Check(site_id=site_id, name=name, status="skipped", detail="nothing logged")
                )
            return None, None
        step, value = last
        if relative_difference(value, recomputed) > REPORTED_TOLERANCE:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="mlflow",
                    source=f"{self.store.tracking_uri} {where}",
                    problem=f"last epsilon_spent (step {step}) is {fmt(value, 10)} but the "
                    f"ledger copy gives {fmt(recomputed, 10)} at the end of run {self.run.name!r}",
                )
            )
        else:
            collect.checks.append(
                Check(
                    site_id=site_id,
                    name=name,
                    status="pass",
                    detail=f"step {step}: {fmt(value)} = recomputed {fmt(recomputed)}"
                    + ("" if run_id is not None else " (the simulation's site table)"),
                )
            )
        return step, value


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
