"""`medfed aggregator start`, `medfed run` and `medfed demo`: the federation's commands."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from medfed.cli.live import RunProgress, say
from medfed.cli.service import LogFormatOption, reporter, rich_console, serve
from medfed.errors import ConfigError, TransportError
from medfed.logs import LOG_FORMAT_ENV, redact_secrets, resolve_log_format

aggregator_app = typer.Typer(help="Run the aggregator (Flower SuperLink).", no_args_is_help=True)

WorkspaceOption = Annotated[
    Path, typer.Option("--workspace", "-w", help="The workspace `medfed provision` made.")
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI to log runs to (a server or a database). Default: "
        "MLFLOW_TRACKING_URI, else the workspace's mlflow.db (SQLite).",
    ),
]


@aggregator_app.command("start")
def aggregator_start(
    workspace: WorkspaceOption,
    tracking_uri: TrackingUriOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Start the SuperLink (TLS, node authentication) and register the provisioned sites.

    Every run is logged to MLflow (one parent run, one child run per site). Runs in the
    foreground until Ctrl-C or SIGTERM, as a service manager expects.
    """
    from medfed.transport.runner import start_aggregator
    from medfed.workspace import load_workspace

    chosen = resolve_log_format(log_format)
    say = reporter(chosen, "medfed.aggregator")
    # The SuperLink's environment reaches the ServerApp processes it starts.
    os.environ[LOG_FORMAT_ENV] = chosen
    loaded = load_workspace(workspace)
    aggregator = start_aggregator(workspace=loaded, tracking_uri=tracking_uri)
    process = aggregator.process
    say(f"SuperLink listening on {loaded.manifest.address} (TLS, node auth on)")
    for item in aggregator.registrations:
        state = "already registered" if item.already_registered else f"node {item.node_id}"
        say(f"  site {item.site_id}: {state}")
    if aggregator.tracking_uri is not None:
        say(f"MLflow tracking: {redact_secrets(aggregator.tracking_uri)}")
    else:
        say("MLflow tracking: off (MLflow is not installed)")
    say(f"log: {process.log_file}; Ctrl-C stops the aggregator")
    serve(say, process, what="the SuperLink", stopping="stopping the aggregator")


def run(
    workspace: WorkspaceOption,
    name: Annotated[str, typer.Option("--name", help="Run name (its directory, resume key).")],
    rounds: Annotated[int | None, typer.Option(min=1, help="Default: 3, or --settings'.")] = None,
    local_epochs: Annotated[
        int | None, typer.Option(min=1, help="Default: 2, or --settings'.")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="fedavg | fedprox | fedadam | median | trimmed_mean (default: fedavg, or "
            "--settings')"
        ),
    ] = None,
    proximal_mu: Annotated[float, typer.Option(help="FedProx term (fedprox only).")] = 0.0,
    learning_rate: Annotated[float | None, typer.Option(help="Default: each site's.")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="Default: each site's.")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Default: each site's.")] = None,
    min_sites: Annotated[int, typer.Option(min=1, help="Successful sites a round needs.")] = 2,
    sites: Annotated[
        str | None, typer.Option(help="Comma-separated site ids (default: all online).")
    ] = None,
    network: Annotated[str, typer.Option(help="unet | attention_unet")] = "unet",
    round_timeout: Annotated[float, typer.Option(help="Seconds a site may take.")] = 900.0,
    wait_for_sites: Annotated[float, typer.Option(help="Seconds to wait for sites.")] = 120.0,
    seed: int = 0,
    settings_file: Annotated[
        Path | None,
        typer.Option("--settings", help="JSON file of run settings (options above override)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run of this name.")
    ] = False,
    project: Annotated[
        str | None,
        typer.Option(help="The study the run belongs to; sites accept runs by project."),
    ] = None,
    no_follow: Annotated[
        bool, typer.Option("--no-follow", help="Submit only; do not stream the progress.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to follow the run.")] = 7200.0,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="Masked uploads: the aggregator learns only the sum of the sites' updates "
            "(fedavg, fedprox, fedadam).",
        ),
    ] = False,
    distributed_noise: Annotated[
        int | None,
        typer.Option(
            "--distributed-noise",
            min=2,
            metavar="SITES",
            help="Each site adds 1/sqrt(SITES) of the noise and secure aggregation sums the "
            "shares (needs --secure-aggregation, one local epoch, --learning-rate and "
            "--max-grad-norm; each site's policy must allow it).",
        ),
    ] = None,
) -> None:
    """Submit a federation run to the running aggregator and stream its progress."""
    from medfed.aggregator.secure_round import check_settings
    from medfed.config.run import parse_run_settings
    from medfed.transport.deploy import require_aggregator
    from medfed.transport.provision import parse_sites
    from medfed.transport.runner import follow, submit
    from medfed.workspace import load_workspace

    data: dict[str, Any] = {}
    if settings_file is not None:
        try:
            data = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{settings_file}: cannot read settings ({exc})") from None
    # Flags left out keep what --settings says (a strategy preset's rounds, say), else the
    # run settings' defaults.
    given = {
        "rounds": rounds,
        "local_epochs": local_epochs,
        "learning_rate": learning_rate,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
    }
    data.update({key: value for key, value in given.items() if value is not None})
    chosen = {"name": strategy} if strategy is not None else {}
    data.update(
        run_name=name,
        strategy={**data.get("strategy", {}), **chosen, "proximal_mu": proximal_mu},
        min_sites=min_sites,
        sites=None if sites is None else parse_sites(sites),
        model={**data.get("model", {}), "network": network},
        round_timeout_s=round_timeout,
        wait_for_sites_s=wait_for_sites,
        seed=seed,
        resume=resume,
    )
    if project is not None:
        data["project"] = project
    if secure_aggregation:
        data["secure_aggregation"] = True
    if distributed_noise is not None:
        data["distributed_noise"] = {
            **data.get("distributed_noise", {}),
            "sites": distributed_noise,
        }
    settings = parse_run_settings(data, source="run settings")
    check_settings(settings)  # a robust strategy with secure aggregation is refused here
    loaded = load_workspace(workspace)
    console = rich_console()
    require_aggregator(workspace=loaded)
    try:
        run_id = submit(workspace=loaded, settings=settings)
    except TransportError:
        require_aggregator(workspace=loaded)  # it went away since: say that, not flwr's words
        raise
    say(console, f"submitted run {settings.run_name!r} (Flower run {run_id})")
    if no_follow:
        return
    with RunProgress(console) as progress:
        for event in follow(workspace=loaded, run_name=name, run_id=run_id, timeout_s=timeout):
            progress(event)
    _show_end(console, progress)
    _show_tracking(console, loaded.root, settings.run_name)
    if progress.board.ended is not None and progress.board.ended.status == "failed":
        raise TransportError(
            f"run {name!r} failed at the aggregator",
            hint=f"see {loaded.layout.logs / 'superlink.log'} for the ServerApp's output",
        )


def demo(
    sites: Annotated[int, typer.Option(min=1, max=26, help="Number of sites.")] = 3,
    rounds: Annotated[int, typer.Option(min=1)] = 3,
    local_epochs: Annotated[int, typer.Option(min=1)] = 5,
    cases: Annotated[int, typer.Option(min=8, help="Synthetic patients per site.")] = 30,
    size: Annotated[int, typer.Option(min=16, help="Volume edge (voxels).")] = 32,
    workspace: Annotated[
        Path, typer.Option("--workspace", "-w", help="New directory for everything.")
    ] = Path("medfed-demo"),
    port: Annotated[int | None, typer.Option(help="SuperLink port (default: a free one).")] = None,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="One process, no network (quick look).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an earlier demo in --workspace.")
    ] = False,
    tracking_uri: TrackingUriOption = None,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation",
            help="Masked uploads: the aggregator learns only the sum of the sites' updates "
            "(fedavg, fedprox, fedadam).",
        ),
    ] = False,
) -> None:
    """A whole federation on this machine: aggregator and sites as processes, TLS on, DP on."""
    import dataclasses

    from medfed.api.demo import (
        check_demo_port,
        claim_demo_directory,
        prepare_federation,
        run_deployed,
    )
    from medfed.transport.processes import free_port

    if in_process and port is not None:
        raise click.UsageError(
            "--port and --in-process do not go together: an in-process demo opens no port "
            "(leave out --port, or --in-process for the deployed demo)"
        )
    console = rich_console()
    if tracking_uri is not None:  # a bad URI is refused before anything is made
        from medfed.tracking.uri import resolve_tracking_uri

        resolve_tracking_uri(workspace_root=workspace, explicit=tracking_uri)
    if port is not None:  # a busy port is refused before minutes go into the data
        check_demo_port(port)
    claim_demo_directory(workspace, force=force)
    started = time.monotonic()
    with RunProgress(console) as progress:
        progress.phase(f"preparing {sites} synthetic sites in {workspace.absolute()}")
        setup = prepare_federation(
            root=workspace,
            sites=sites,
            cases=cases,
            size=size,
            rounds=rounds,
            local_epochs=local_epochs,
            port=port or free_port(),
        )
        if secure_aggregation:
            settings = setup.settings.model_copy(update={"secure_aggregation": True})
            setup = dataclasses.replace(setup, settings=settings)
        if in_process:
            from medfed.tracking.uri import mlflow_available, resolve_tracking_uri
            from medfed.transport.inprocess import run_in_process

            uri = None
            if tracking_uri is not None or mlflow_available():
                uri = resolve_tracking_uri(
                    workspace_root=setup.workspace.root, explicit=tracking_uri
                )
            progress.phase("running the aggregator and the sites in this process")
            run_in_process(
                workspace=setup.workspace,
                site_configs=setup.site_configs,
                settings=setup.settings,
                on_event=progress,
                tracking_uri=uri,
            )
        else:
            run_deployed(
                setup=setup,
                on_event=progress,
                tracking_uri=tracking_uri,
                on_phase=progress.phase,
            )
    _show_end(console, progress)
    say(
        console,
        f"{time.monotonic() - started:.0f} s; workspace {setup.workspace.root}, logs in "
        f"{setup.workspace.layout.logs}, site ledgers under {setup.root / 'sites'}",
    )
    _show_tracking(console, setup.workspace.root, setup.settings.run_name)


def _show_tracking(console: Any, workspace_root: Path, run_name: str) -> None:
    """Where the run is in MLflow (from the run directory's mlflow.json), when it is there."""
    from medfed.tracking.info import describe, read_tracking_info
    from medfed.tracking.ui_links import ui_links
    from medfed.workspace import run_paths

    paths = run_paths(workspace_root, run_name)
    info = read_tracking_info(paths=paths)
    if info is not None:
        say(console, describe(info))
        links = ui_links(info=info)
        if links.command is not None:
            say(console, f"MLflow UI: {links.command}")
        if links.run is not None:
            say(console, f"{'then open' if links.command else 'open'} {links.run}")
    if paths.mlflow_pending.is_file():
        say(
            console,
            f"MLflow has not received all of the run yet: the rest waits in "
            f"{paths.mlflow_pending} and is sent when the run is resumed",
        )


def _show_end(console: Any, progress: RunProgress) -> None:
    """The sites' table of a run that ended with a summary, with what its events said."""
    from medfed.cli.progress import print_summary

    ended = progress.board.ended
    if ended is not None and ended.summary is not None:
        print_summary(console, ended.summary, notes=progress.board.notes())
