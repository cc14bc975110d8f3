"""`medfed site ...`: what hospital IT runs on a site node."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated

import typer

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
    from medfed.site.trainer import StepReport, train_local

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
        f"validation patients, {result.steps} DP steps (q={result.sample_rate:.3f}, "
        f"sigma={result.noise_multiplier:.3f})"
    )
    typer.echo(f"validation Dice: {result.dice_before:.3f} untrained -> {result.dice_after:.3f}")
    typer.echo(
        f"privacy: epsilon {result.epsilon_spent:.3f} of cap {result.epsilon_cap:g} spent "
        f"(delta {result.delta:g}, {result.accountant})"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(f"metrics:    {result.metrics_file}")
