"""``verify_workspace``: does every site's privacy record hold, and are the reported numbers honest?

For each site registered in the workspace:

1. the aggregator's copy of its ledger (``<workspace>/ledgers/<site>.ledger.jsonl``) verifies:
   hash chain, signatures against the site's *registered* public key (the workspace's
   ``ledger_key.pub``, checked against the key id in ``workspace.yaml``; never a key that came
   with a ledger), canonical form, seq order, commits;
2. each ledger a site handed over (``site_ledgers``) verifies the same way, with its head
   file, and the aggregator's copy is a prefix of it (more entries at the site are rounds the
   aggregator has not seen; a differing entry is a finding);
3. epsilon is recomputed with Opacus and with Google's dp-accounting (see
   :mod:`medfed.audit.accounting`): the two RDP implementations agree at their shared integer
   orders, and PLD stays at or below RDP; a site with distributed-noise steps also gets the
   epsilon of each guarantee (distributed and local) beside the one its budget is enforced on;
4. each run's ``summary.json`` and MLflow report the epsilon of the copy at that run's end
   (see :mod:`medfed.audit.runs`);
5. the epsilon spent is within the site's stored cap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from medfed.audit.findings import Collector, Finding
from medfed.audit.result import AuditResult, RunMode, SiteAudit
from medfed.audit.runs import RunEpsilon, VerifiedCopy, audit_run
from medfed.audit.sites import audit_site, relative_source
from medfed.audit.sources import RunRecord, read_runs
from medfed.errors import ConfigError
from medfed.workspace import Workspace, load_workspace

__all__ = ["AuditResult", "SiteAudit", "verify_workspace"]


def verify_workspace(
    *,
    workspace: Path,
    run_name: str | None = None,
    site_ledgers: Mapping[str, Path] | None = None,
    tracking_uri: str | None = None,
    mlflow_run: str | None = None,
) -> AuditResult:
    """Audit a workspace's ledgers, epsilons and budgets; see the module docstring.

    ``run_name`` limits the run checks to one run (every run with a summary otherwise).
    ``site_ledgers`` maps site ids to ledgers the sites handed over. ``tracking_uri`` and
    ``mlflow_run`` (a parent run id) point at MLflow where a run has no ``mlflow.json``, or
    override it. Raises ConfigError when the workspace or a named run or site does not exist;
    everything else that does not hold becomes a finding.
    """
    check_mlflow_run(run_name=run_name, mlflow_run=mlflow_run)
    ws = load_workspace(Path(workspace))
    runs = read_runs(workspace_root=ws.root, run_name=run_name)
    return verify_runs(
        workspace=ws,
        runs=runs,
        site_ledgers=site_ledgers,
        tracking_uri=tracking_uri,
        mlflow_run=mlflow_run,
    )


def check_mlflow_run(*, run_name: str | None, mlflow_run: str | None) -> None:
    """An MLflow parent run id names one run: refuse it for a whole workspace."""
    if mlflow_run is not None and run_name is None:
        raise ConfigError(
            "an MLflow parent run id belongs to one run", hint="give --run NAME with --mlflow-run"
        )


def verify_runs(
    *,
    workspace: Workspace,
    runs: Sequence[RunRecord],
    site_ledgers: Mapping[str, Path] | None,
    tracking_uri: str | None,
    mlflow_run: str | None,
) -> AuditResult:
    """:func:`verify_workspace` on runs already read (a report reads them once)."""
    ws = workspace
    registered = [entry.site_id for entry in ws.manifest.sites]
    given = {str(site): Path(path) for site, path in (site_ledgers or {}).items()}
    unknown = sorted(set(given) - set(registered))
    if unknown:
        raise ConfigError(
            f"--ledger names sites the workspace does not register: {', '.join(unknown)}",
            hint=f"registered sites: {', '.join(registered)}",
        )
    collect = Collector()
    for site_id in ws.layout.copy_site_ids():
        if site_id not in registered:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="registration",
                    source=relative_source(workspace=ws, path=ws.layout.ledger_copy(site_id)),
                    problem="a ledger copy of a site the workspace does not register",
                )
            )
    sites: dict[str, SiteAudit] = {}
    copies: dict[str, VerifiedCopy] = {}
    for site_id in registered:
        sites[site_id], verified = audit_site(
            workspace=ws, site_id=site_id, site_ledger=given.get(site_id), collect=collect
        )
        if verified is not None:
            copies[site_id] = verified
    by_site: dict[str, list[RunEpsilon]] = {site: [] for site in registered}
    for run in runs:
        numbers = audit_run(
            run=run,
            copies=copies,
            tracking_uri=tracking_uri,
            mlflow_run=mlflow_run,
            collect=collect,
        )
        for item in numbers:
            by_site.setdefault(item.site_id, []).append(item)
    audited = tuple(
        dataclasses.replace(sites[site_id], runs=tuple(by_site.get(site_id, [])))
        for site_id in registered
    )
    return AuditResult(
        workspace=ws.root,
        run_names=tuple(run.name for run in runs),
        sites=audited,
        findings=tuple(collect.findings),
        checks=tuple(collect.checks),
        run_modes=tuple(run_mode(run) for run in runs),
    )


def run_mode(run: RunRecord) -> RunMode:
    """The aggregation a run's guarantees were given under, from its settings."""
    settings = run.settings or {}
    secure = settings.get("secure_aggregation")
    distributed = settings.get("distributed_noise")
    strategy = settings.get("strategy")
    return RunMode(
        run_name=run.name,
        secure_aggregation=None if secure is None else bool(secure),
        distributed_sites=int(distributed["sites"]) if isinstance(distributed, Mapping) else None,
        site_level=isinstance(strategy, Mapping) and strategy.get("central_dp") is not None,
    )
