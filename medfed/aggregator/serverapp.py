"""The Flower ServerApp of the medfed aggregator.

The researcher's settings arrive as JSON under one key of Flower's run config; the aggregator's
own state (its workspace: registered site keys, ledger copies, run directories) is named by the
``MEDFED_WORKSPACE`` environment variable that `medfed aggregator start` gives the SuperLink,
so a run can never point the aggregator at another directory. Likewise ``MEDFED_TRACKING_URI``,
when set, is the MLflow store every run is logged to (:mod:`medfed.tracking`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medfed.config.run import RUN_CONFIG_KEY, RunSettings
from medfed.errors import ConfigError, MedfedError

WORKSPACE_ENV = "MEDFED_WORKSPACE"

log = logging.getLogger("medfed.aggregator")

app = ServerApp()


def workspace_from_environment() -> Path:
    value = os.environ.get(WORKSPACE_ENV)
    if not value:
        raise ConfigError(
            f"{WORKSPACE_ENV} is not set for the ServerApp",
            hint="start the aggregator with `medfed aggregator start --workspace DIR`",
        )
    return Path(value)


def settings_from(context: Context) -> RunSettings:
    value = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(value, str):
        raise ConfigError(
            f"the run config has no {RUN_CONFIG_KEY!r} JSON",
            hint="submit runs with `medfed run`, which sends the settings",
        )
    return RunSettings.from_json(value, source=f"run config {RUN_CONFIG_KEY!r}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from medfed.aggregator.federation import run_federation
    from medfed.logs import configure_from_env
    from medfed.tracking.tracker import tracking
    from medfed.tracking.uri import TRACKING_URI_ENV
    from medfed.workspace import load_workspace

    configure_from_env()
    try:
        settings = settings_from(context)
        workspace = load_workspace(workspace_from_environment())
        with tracking(
            tracking_uri=os.environ.get(TRACKING_URI_ENV) or None,
            run_dir=workspace.layout.run(settings.run_name).directory,
        ) as on_event:
            result = run_federation(
                grid=grid, settings=settings, workspace=workspace, on_event=on_event
            )
    except MedfedError as exc:
        log.error("%s", exc.one_line())
        raise SystemExit(exc.exit_code) from None
    log.info("run %s %s: %s", result.run_name, result.status, result.reason)
