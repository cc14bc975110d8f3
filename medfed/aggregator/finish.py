"""The end of a run: its summary, then the report it leaves, then its last event.

The report (:attr:`medfed.workspace.RunPaths.report`) is what readers of the run need without
the aggregator running: the ledger copies as they stood at the run's end, the budget state,
two plots (:mod:`medfed.tracking.plots`) and the auditor's report (:mod:`medfed.audit`), built
here side by side; MLflow tracking uploads the directory as the run's artifacts. Neither a
missing plotting library nor a failing report ever fails a run: each is logged and left out.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.aggregator.context import RunContext
from medfed.aggregator.outcome import FederationResult
from medfed.aggregator.site_level_ledger import site_level_ledger_path
from medfed.errors import MedfedError
from medfed.run_events import RunFailed, RunFinished, RunStopped, read_events
from medfed.storage import make_private_dirs, replace_file
from medfed.workspace import WorkspaceLayout

log = logging.getLogger("medfed.aggregator")


def finish(
    ctx: RunContext,
    status: str,
    reason: str,
    completed: int,
    model_dir: Path | None = None,
    dice_initial: float = math.nan,
    dice_final: float = math.nan,
) -> FederationResult:
    """Write the summary and the report, emit the run's last event; the run's result."""
    budget_state = ctx.tracker.state_json()
    budgets = budget_state["sites"]
    sites = [record.to_json(budgets.get(site)) for site, record in sorted(ctx.sites.items())]
    if model_dir is None and completed > 0:
        model_dir = ctx.store.paths.global_model(completed)
    result = FederationResult(
        run_name=ctx.run_name,
        status=status,
        reason=reason,
        rounds_completed=completed,
        dice_initial=dice_initial,
        dice_final=dice_final,
        sites=sites,
        directory=ctx.store.directory,
        model=model_dir,
    )
    summary = result.summary(budget_state)
    # which aggregation the guarantee was given under: the aggregator saw each site's update,
    # or only their sum
    summary["secure_aggregation"] = ctx.settings.secure_aggregation
    noise = ctx.settings.distributed_noise
    summary["distributed_noise"] = None if noise is None else noise.model_dump(mode="json")
    if ctx.site_level is not None and ctx.settings.strategy.central_dp is not None:
        # site-level (central) DP: a different unit, kept apart from the sites' budgets
        summary["site_level_privacy"] = ctx.site_level.summary(
            delta=ctx.settings.strategy.central_dp.delta
        )
    ctx.store.write_summary(summary)
    write_report(
        layout=ctx.workspace.layout,
        run_name=ctx.run_name,
        sites=sorted(ctx.sites),
        budget_state=budget_state,
    )
    ended = RunFinished if status == "finished" else RunStopped
    ctx.emit(ended(run_name=ctx.run_name, reason=reason, summary=summary))
    return result


def fail(ctx: RunContext, exc: MedfedError) -> None:
    """A run that stopped on an error: the report as things stood (no summary), its last event."""
    try:
        write_report(
            layout=ctx.workspace.layout,
            run_name=ctx.run_name,
            sites=sorted(ctx.sites),
            budget_state=ctx.tracker.state_json(),
        )
    except Exception:
        log.exception("cannot write the report of failed run %s", ctx.run_name)
    ctx.emit(RunFailed(run_name=ctx.run_name, reason=exc.one_line()))


def write_report(
    *,
    layout: WorkspaceLayout,
    run_name: str,
    sites: Sequence[str],
    budget_state: Mapping[str, Any],
) -> Path:
    """The run's report directory, written anew: ledgers, budget state, plots, audit report."""
    paths = layout.run(run_name)
    report = paths.report
    shutil.rmtree(report, ignore_errors=True)
    make_private_dirs(report / "ledgers")
    for site in sites:
        copy = layout.ledger_copy(site)
        if copy.is_file():
            shutil.copyfile(copy, report / "ledgers" / copy.name)
    site_level = site_level_ledger_path(paths.directory)
    if site_level.is_file():
        # site-level DP's own ledger (its unit is a whole site), beside the sites' ledgers
        shutil.copyfile(site_level, report / "ledgers" / site_level.name)
    replace_file(report / "budget_state.json", _json(budget_state))
    _write_plots(paths.events, report / "plots", title=run_name)
    _write_audit_report(layout.root, run_name, report / "audit")
    return report


def _write_plots(events_file: Path, directory: Path, *, title: str) -> None:
    try:
        from medfed.tracking.plots import series_from_events, write_plots

        events, _ = read_events(events_file)
        write_plots(series=series_from_events(events), directory=directory, title=title)
    except ImportError:
        log.warning("matplotlib is not installed: the run's report has no plots")
    except Exception:
        log.exception("cannot draw the plots of run %s", title)


def _write_audit_report(workspace_root: Path, run_name: str, directory: Path) -> None:
    """The auditor's report of this run, as it stands at the run's end (JSON, CSV, HTML, PDF).

    A federation of many sites gets federation-wide pages (:mod:`medfed.audit.overview`): its
    size stays bounded whatever the number of sites, and every site's detail is in the JSON
    and the CSV beside them.
    """
    try:
        from medfed.audit import build_report

        report = build_report(workspace=workspace_root, run_name=run_name)
    except Exception:
        log.exception("cannot build the audit report of run %s", run_name)
        return
    try:
        # JSON, CSV, HTML, then the PDF: what was written before a failure stays.
        report.write_files(directory)
    except Exception:
        log.exception("cannot write every form of the audit report of run %s", run_name)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
