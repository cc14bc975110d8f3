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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.audit.accounting import ACCOUNTANT_DESCRIPTIONS, cumulative_opacus_rdp
from medfed.audit.canary import CanaryAudit, collect_canary_audits
from medfed.audit.contents import build_document
from medfed.audit.document import Document
from medfed.audit.html import render_html
from medfed.audit.mlflow_store import MlflowStore, resolve_target
from medfed.audit.overview import DETAIL_ELSEWHERE
from medfed.audit.pdf import write_pdf
from medfed.audit.sites_csv import sites_csv
from medfed.audit.sources import RunRecord, read_runs
from medfed.audit.statement import ReleaseRow, RoundRow, SiteStatement
from medfed.audit.verify import AuditResult, SiteAudit, check_mlflow_run, verify_runs
from medfed.model_average import EMA_MODEL_DIR
from medfed.model_files import MANIFEST_NAME
from medfed.privacy.events import ReserveEntry, TermsEntry
from medfed.privacy.ledger import LedgerReport
from medfed.storage import make_private_dirs, replace_file
from medfed.workspace import RunPaths, load_workspace

REPORT_FILES: Final = {
    "html": "audit_report.html",
    "json": "audit_report.json",
    "csv": "audit_sites.csv",
    "pdf": "audit_report.pdf",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    """The whole report: a statement per site and the verification it rests on."""

    generated_at: str
    workspace: Path
    verification: AuditResult
    sites: tuple[SiteStatement, ...]
    canary_audits: tuple[CanaryAudit, ...] = ()

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
            "canary_audits": [audit.to_json() for audit in self.canary_audits],
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def document(self, *, plots: bool | None = None, detail: str = DETAIL_ELSEWHERE) -> Document:
        """The report's contents, which the HTML and the PDF both draw.

        ``plots`` None draws the plots where matplotlib is installed; ``detail`` is where a
        federation too large for a section per site has every site's full statement.
        """
        return build_document(
            workspace=self.workspace,
            generated_at=self.generated_at,
            verification=self.verification,
            sites=self.sites,
            canary_audits=self.canary_audits,
            plots=plots,
            detail=detail,
        )

    def to_html(self) -> str:
        """A self-contained HTML page (inline CSS and SVG plots; no external resources)."""
        return render_html(self.document())

    def write_pdf(self, path: Path) -> None:
        """The same contents as :meth:`to_html` as a PDF: tables, and the plots as images."""
        write_pdf(self.document(), path=Path(path))

    def to_sites_csv(self) -> str:
        """One row per site (:func:`medfed.audit.sites_csv.sites_csv`)."""
        return sites_csv(self.sites)

    def write_files(self, directory: Path, *, pdf: bool = True) -> ReportFiles:
        """The report as :data:`REPORT_FILES` in ``directory``: JSON, CSV, HTML, then PDF.

        The JSON and the CSV come first, so that a federation's per-site data is there even
        when drawing the pages fails; the pages name them as where each site's detail is.
        """
        directory = Path(directory)
        make_private_dirs(directory)
        files = ReportFiles(directory=directory)
        replace_file(files.json, self.to_json_text().encode("utf-8"))
        replace_file(files.csv, self.to_sites_csv().encode("utf-8"))
        detail = (
            f"every site's full statement is in {files.json.name} and one row per site in "
            f"{files.csv.name}, beside this report"
        )
        document = self.document(detail=detail)
        replace_file(files.html, render_html(document).encode("utf-8"))
        if pdf:
            write_pdf(document, path=files.pdf)
        return files


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportFiles:
    """Where :meth:`AuditReport.write_files` puts each form of the report."""

    directory: Path

    @property
    def html(self) -> Path:
        return self.directory / REPORT_FILES["html"]

    @property
    def json(self) -> Path:
        return self.directory / REPORT_FILES["json"]

    @property
    def csv(self) -> Path:
        return self.directory / REPORT_FILES["csv"]

    @property
    def pdf(self) -> Path:
        return self.directory / REPORT_FILES["pdf"]


def build_report(
    *,
    workspace: Path,
    run_name: str | None = None,
    site_ledgers: Mapping[str, Path] | None = None,
    tracking_uri: str | None = None,
    mlflow_run: str | None = None,
    canary_results: Sequence[Path] = (),
) -> AuditReport:
    """Verify the workspace and build every registered site's statement from what verified.

    ``canary_results`` are ``medfed audit canary`` result files; those beside the
    ``site_ledgers`` (in the ledger's folder's ``audit/``) are read too.
    """
    check_mlflow_run(run_name=run_name, mlflow_run=mlflow_run)
    audits, unreadable = collect_canary_audits(named=canary_results, site_ledgers=site_ledgers)
    ws = load_workspace(Path(workspace))
    runs = read_runs(workspace_root=ws.root, run_name=run_name)
    result = verify_runs(
        workspace=ws,
        runs=runs,
        site_ledgers=site_ledgers,
        tracking_uri=tracking_uri,
        mlflow_run=mlflow_run,
    )
    result = dataclasses.replace(
        result,
        findings=(
            *result.findings,
            *unreadable,
            *(f for f in (a.finding() for a in audits) if f is not None),
        ),
        checks=(*result.checks, *(c for c in (a.check() for a in audits) if c is not None)),
    )
    models = _ModelSource(runs, tracking_uri=tracking_uri, mlflow_run=mlflow_run)
    statements = tuple(_statement(site, result, runs, models) for site in result.sites)
    return AuditReport(
        generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        workspace=result.workspace,
        verification=result,
        sites=statements,
        canary_audits=audits,
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
            "round": event.round,
            "dice_before": event.dice_before,
            "epsilon_spent": event.epsilon_spent,
        }
        for run in runs
        for event in run.site_updates()
        if event.site == site.site_id
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
        distributed=site.distributed,
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
    for directory in sorted(RunPaths(directory=run.directory).global_models.glob("round-*")):
        try:
            meta = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
            metadata = meta["metadata"]
            sites = metadata.get("sites", [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        direct = isinstance(sites, list) and site_id in sites
        rounds.append((directory, metadata.get("round"), direct, meta.get("weights") or {}))
    first = next((index for index, item in enumerate(rounds) if item[2]), None)
    found = [
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
    average = _moving_average(run, trained={m["round"] for m in found}, final=final)
    return found if average is None else [*found, average]


def _moving_average(run: RunRecord, *, trained: set[Any], final: object) -> dict[str, Any] | None:
    """The run's moving average of its global models (``ema: {decay}``), when it averages a
    round trained on the site's data: named as what it is, with the rounds it averages."""
    directory = run.directory / EMA_MODEL_DIR
    try:
        meta = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        ema = meta["metadata"]["ema"]
        rounds = [int(r) for r in ema["rounds"]]
        decay = float(ema["decay"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not trained.intersection(rounds):
        return None
    weights = meta.get("weights") or {}
    return {
        "run_name": run.name,
        "round": f"moving average (EMA, decay {decay:g}) of rounds {rounds[0]}-{rounds[-1]}",
        "path": str(directory),
        "direct": False,
        "final": final is not None and Path(str(final)) == directory,
        "sha256": weights.get("sha256") if isinstance(weights, dict) else None,
    }
