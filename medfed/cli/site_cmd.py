"""`medfed site ...`: what hospital IT runs on a site node."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medfed.cli.service import LogFormatOption, reporter, serve
from medfed.errors import MedfedError
from medfed.logs import LOG_FORMAT_ENV, resolve_log_format

if TYPE_CHECKING:
    from medfed.site.preflight import PreflightReport

app = typer.Typer(help="Run a hospital's site node.", no_args_is_help=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The site's configuration file (site.yaml).")
]


@app.command()
def train(
    config: ConfigOption,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Override training.epochs for this run.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train locally with DP-SGD on the site's own data (no federation)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medfed.config import load_site_config
    from medfed.site.epochs import StepReport
    from medfed.site.trainer import train_local

    site = load_site_config(config)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("medfed.site").setLevel(logging.WARNING)  # the progress bar says it
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]} loss {task.fields[loss]} eps {task.fields[eps]}"),
        TimeElapsedColumn(),
    )
    # Shown from the first step on, so a refusal (cap, ledger, data) prints its line alone.
    progress = Progress(*columns, console=console, disable=as_json)
    task = progress.add_task(f"{site.site_id} DP-SGD", total=None, epoch=1, loss="-", eps="-")

    def on_step(report: StepReport) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(
            task,
            completed=report.step,
            total=report.total_steps,
            epoch=report.epoch,
            loss="-" if report.loss is None else f"{report.loss:.3f}",
            eps="-" if math.isnan(report.epsilon) else f"{report.epsilon:.2f}",
        )

    try:
        result = train_local(config=site, epochs=epochs, on_step=on_step)
    finally:
        if progress.live.is_started:
            progress.stop()

    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, default=str))
        return
    typer.echo(
        f"site {result.site_id}: {result.train_patients} training / {result.val_patients} "
        f"validation patients (released with noise: {result.released_train_patients} / "
        f"{result.released_val_patients}), {result.steps} DP steps (q={result.sample_rate:.3f}, "
        f"sigma={result.noise_multiplier:.3f})"
    )
    typer.echo(f"validation Dice: {result.dice_before:.3f} untrained -> {result.dice_after:.3f}")
    typer.echo(
        f"privacy: epsilon {result.epsilon_spent:.3f} of cap {result.epsilon_cap:g} spent "
        f"(delta {result.delta:g}, {result.accountant})"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(f"metrics:    {result.metrics_file}")


@app.command()
def init(
    kit: Annotated[
        Path, typer.Option("--kit", help="The site's kit directory made by `medfed provision`.")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="The dataset manifest (CSV or YAML) of this site.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The site.yaml to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Work directory (ledger, logs, cache). "
                "Default: medfed-work-<site id> next to --out."
            )
        ),
    ] = None,
    epsilon_cap: Annotated[
        float | None, typer.Option(help="Lifetime privacy cap agreed with the federation.")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="Delta of the cap (below 1/patients).")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option(help="DP-SGD noise multiplier (default 1.0).")
    ] = None,
) -> None:
    """Write a commented site.yaml from the provisioning kit and the dataset manifest."""
    from medfed.site.onboarding import init_site

    result = init_site(
        kit=kit,
        manifest=data,
        out=out,
        force=force,
        workdir=workdir,
        epsilon_cap=epsilon_cap,
        delta=delta,
        noise_multiplier=noise_multiplier,
    )
    typer.echo(
        f"wrote {result.path} for site {result.site_id} ({result.n_cases} cases; aggregator "
        f"{result.superlink_address}; work directory {result.workdir})"
    )
    typer.echo("next:")
    typer.echo(f"  medfed site check --config {result.path}")
    typer.echo(f"  medfed site start --config {result.path}")


@app.command()
def check(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    min_free_gb: Annotated[
        float, typer.Option(min=0, help="Warn when the work directory has less free disk.")
    ] = 5.0,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for the aggregator per check.")
    ] = 5.0,
) -> None:
    """Preflight before going live: keys, certificates, aggregator, registration, data, ledger.

    Every check says PASS, WARN or FAIL, with the fix. Exits 0 when nothing failed (warnings
    allowed) and 11 when any check failed.
    """
    from medfed.site.preflight import PREFLIGHT_FAILED_EXIT_CODE, run_preflight

    report = run_preflight(
        config_path=config, min_free_bytes=int(min_free_gb * 1024**3), timeout_s=timeout
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_preflight(report)
    if not report.ok:
        raise typer.Exit(code=PREFLIGHT_FAILED_EXIT_CODE)


def _print_preflight(report: PreflightReport) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    table = Table(title=f"medfed site check: {report.site_id or report.config_path}")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    # Folded, not cut: the operator needs whole paths and whole commands.
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold")
    for result in report.results:
        colour = colours[result.status]
        table.add_row(result.name, f"[{colour}]{result.status}[/]", result.detail, result.fix or "")
    console = Console(highlight=False)
    console.print(table)
    counts = {s: sum(1 for r in report.results if r.status == s) for s in colours}
    verdict = "ready" if report.ok else "NOT ready"
    console.print(
        f"{verdict}: {counts['PASS']} passed, {counts['WARN']} warning(s), {counts['FAIL']} failed"
    )


@app.command()
def status(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Whether the node runs, its last run and round, its privacy budget and its last error."""
    from medfed.config import load_site_config
    from medfed.site.node_status import read_status

    state = read_status(config=load_site_config(config))
    if as_json:
        typer.echo(json.dumps(state.to_dict(), indent=2))
        return
    online = (
        f"online (pid {state.pid}, since {state.started_at})"
        if state.online
        else (f"offline: {state.offline_reason}")
    )
    typer.echo(f"site {state.site_id}: {online}")
    if state.last_run_id is not None:
        round_text = "-" if state.last_round is None or state.last_round < 0 else state.last_round
        typer.echo(
            f"last message: {state.last_kind} of run {state.last_run_id} round {round_text} "
            f"at {state.last_message_at} ({state.messages} handled, {state.declined} declined)"
        )
    else:
        typer.echo("last message: none yet")
    if state.budget_error is not None:
        typer.echo(f"privacy budget: unknown, {state.budget_error}")
    else:
        typer.echo(
            f"privacy budget: epsilon {state.epsilon_spent:.3g} of {state.epsilon_cap:g} spent, "
            f"{state.epsilon_remaining:.3g} left"
        )
    if state.last_error is not None:
        typer.echo(f"last error: {state.last_error} (at {state.last_error_at})")
    else:
        typer.echo("last error: none")


@app.command("start")
def site_start(
    config: Annotated[Path, typer.Option("--config", "-c", help="The site's site.yaml.")],
    log_format: LogFormatOption = None,
) -> None:
    """Start this site's node (Flower SuperNode): TLS, its node key, its site config.

    Runs in the foreground until Ctrl-C or SIGTERM; reconnects when the aggregator restarts.

    Runs only the medfed app of this medfed version (see policy.allowed_app_hashes).

    SIGTERM aborts a round in progress; the steps taken are committed to the ledger first.
    """
    from medfed.config import load_site_config
    from medfed.site.node_status import record_node_start, record_node_stop
    from medfed.site.node_watch import NodeWatch
    from medfed.transport.deploy import site_transport, start_supernode

    chosen = resolve_log_format(log_format)
    say = reporter(chosen, "medfed.site")
    site = load_site_config(config)
    log_file = site.paths.workdir / "logs" / "supernode.log"
    transport = site_transport(site, config_path=config)
    watch = NodeWatch(
        transport=transport,
        log_file=log_file,
        say=lambda line: say(f"site {site.site_id}: {line}", site_id=site.site_id),
    )
    process = start_supernode(
        config_path=config.absolute(),
        site=site,
        log_file=log_file,
        env={LOG_FORMAT_ENV: chosen},
    )
    reason = "stopped"
    record_node_start(config=site, pid=os.getpid())
    try:
        say(
            f"site {site.site_id}: node connecting to {transport.superlink_address}; "
            f"log: {log_file}; Ctrl-C stops it",
            site_id=site.site_id,
        )
        reason = serve(
            say, process, what="the SuperNode", stopping="stopping the site node", watch=watch
        )
    except MedfedError as exc:
        reason = exc.one_line()
        raise
    except BaseException as exc:
        reason = f"unexpected {type(exc).__name__}"
        raise
    finally:
        record_node_stop(config=site, reason=reason)
