"""`medfed simulate`: many virtual sites on Flower's simulation engine (Ray), on one machine or a
Ray cluster."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medfed.cli.live import say
from medfed.cli.service import rich_console
from medfed.errors import ConfigError, StorageError
from medfed.run_events import ModelInitialised, RoundDone, RunEnded, RunEvent, SitesOnline

if TYPE_CHECKING:
    from medfed.transport.simulation_memory import PeakMemory

# medfed.transport.simulation_tracking.DEFAULT_CHILD_RUNS (not imported: `--help` stays fast)
_CHILD_RUNS = 10


def simulate(
    sites: Annotated[int, typer.Option(min=1, max=99_999, help="Number of virtual sites.")],
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Federation rounds.")] = 1,
    size: Annotated[int, typer.Option(min=8, help="Edge of the tiny 2-D cases (pixels).")] = 16,
    cases: Annotated[int, typer.Option(min=4, help="Synthetic patients per site.")] = 8,
    workspace: Annotated[
        Path,
        typer.Option(
            "--workspace",
            "-w",
            help="Directory of the virtual sites: made on the first run, reused after.",
        ),
    ] = Path("medfed-simulation"),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the measurements as JSON here.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray cluster to run the sites on ('auto': the one this host joined). "
            "Default: RAY_ADDRESS, else Ray starts on this host.",
        ),
    ] = None,
    cpus: Annotated[
        int | None, typer.Option(min=1, help="CPUs of a Ray started here (default: all).")
    ] = None,
    child_runs: Annotated[
        int,
        typer.Option("--child-runs", min=0, help="Sites with an MLflow child run of their own."),
    ] = _CHILD_RUNS,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow store. Default: MLFLOW_TRACKING_URI, else the workspace's mlflow.db.",
        ),
    ] = None,
) -> None:
    """Run one federation over many virtual sites on Flower's simulation engine (Ray).

    The aggregator's round loop and every site's ClientApp are medfed's own: tiny 2-D
    synthetic data, a tiny UNet, DP-SGD and a signed privacy ledger per site, budgets tracked
    from the ledgers. Ray runs one site at a time per CPU. MLflow gets one parent run: the
    run's metrics, report and model as in a deployment, child runs only for the first
    --child-runs sites, and every site's metrics of a round as one table
    (site_metrics/round-NNNN.csv) with their min/mean/max as parent metrics. Afterwards every
    site's ledger is verified and its epsilon recomputed. Needs Ray: the simulation extra.
    """
    from medfed.tracking.uri import mlflow_available, resolve_tracking_uri
    from medfed.transport.simulation import json_report, run_simulation, simulation_settings
    from medfed.transport.simulation_engine import require_engine
    from medfed.transport.simulation_memory import PeakMemory
    from medfed.transport.simulation_sites import prepare_sites
    from medfed.transport.simulation_verify import verify_sites

    require_engine()  # before minutes go into writing sites
    console = rich_console()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    say(console, f"preparing {sites} virtual sites in {workspace.absolute()}")
    made = prepare_sites(root=workspace, sites=sites, cases=cases, size=size)
    uri = None
    if tracking_uri is not None or mlflow_available():
        uri = resolve_tracking_uri(workspace_root=made.workspace.root, explicit=tracking_uri)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    settings = simulation_settings(sites=made, rounds=rounds, run_name=f"sim-{sites}-{stamp}")
    say(console, f"run {settings.run_name}: {rounds} round(s) on Flower's simulation engine")
    memory = PeakMemory()
    run = run_simulation(
        sites=made,
        settings=settings,
        ray_address=ray_address,
        cpus=cpus,
        tracking_uri=uri,
        child_runs=child_runs,
        on_event=lambda event: _show(console, event, memory),
        memory=memory,
    )
    checks = verify_sites(sites=made, summary=_summary(run.result.directory))
    verified = sum(1 for check in checks if check.verified)
    for check in [c for c in checks if not c.verified][:5]:
        say(console, f"  {check.site_id} not verified: {'; '.join(check.problems)}")
    report = json_report(run, verified=verified)
    say(
        console,
        f"{run.result.status}: {report['seconds_per_round']} s per round, peak memory "
        f"{report['peak_rss_mib']:.0f} MiB, {verified} of {sites} sites' ledgers verified "
        f"within their cap; MLflow took {report['tracking_seconds']} s",
    )
    if json_path is not None:
        _write_json(json_path, report)


def _show(console: Any, event: RunEvent, memory: PeakMemory) -> None:
    if isinstance(event, SitesOnline):
        say(console, f"  {len(event.online)} virtual sites online")
    elif isinstance(event, ModelInitialised):
        say(console, f"  initial model from {event.site} ({event.parameters} parameters)")
    elif isinstance(event, RoundDone):
        say(
            console,
            f"  round {event.round}: {event.sites_answered} of {event.sites_asked} sites in "
            f"{event.seconds} s (peak memory so far {memory.sampled_mib:.0f} MiB)",
        )
    elif isinstance(event, RunEnded):
        say(console, f"  {event.kind.replace('_', ' ')}: {event.reason}")


def _summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: the run left no readable summary ({exc})") from None
    return dict(data)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the measurements ({exc.strerror})") from None
