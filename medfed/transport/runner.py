"""Running federations on the real deployment: the aggregator service, run submission, progress.

`medfed aggregator start`, `medfed run` and `medfed demo` are thin layers over this module. A
run's progress is read from the events the ServerApp appends to
``<workspace>/runs/<run_name>/events.jsonl``; Flower's own run status is polled beside it, so
a ServerApp that dies without a last event is reported with its reason, not waited on forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medfed.aggregator.run_store import RunStore
from medfed.aggregator.serverapp import WORKSPACE_ENV
from medfed.app_bundle import medfed_app_directory
from medfed.config.run import RUN_CONFIG_KEY, RunSettings
from medfed.errors import ConfigError, TransportError
from medfed.run_events import RunEnded, RunEvent, RunStarted, read_events
from medfed.tracking.uri import (
    TRACKING_URI_ENV,
    mlflow_available,
    prepare_store,
    resolve_tracking_uri,
)
from medfed.transport.deploy import (
    SiteRegistration,
    SuperLinkState,
    check_superlink_port,
    register_sites,
    start_superlink,
)
from medfed.transport.flwr_cli import DEFAULT_CONNECTION, run_status, submit_run
from medfed.transport.processes import ManagedProcess
from medfed.workspace import Workspace

log = logging.getLogger("medfed.transport")


@dataclass(frozen=True)
class Aggregator:
    process: ManagedProcess
    registrations: list[SiteRegistration]
    tracking_uri: str | None = None  # the MLflow store runs are logged to (None: not tracked)


def start_aggregator(
    *,
    workspace: Workspace,
    log_file: Path | None = None,
    tracking_uri: str | None = None,
    state: SuperLinkState = "sqlite",
) -> Aggregator:
    """Start the SuperLink for ``workspace`` and register every provisioned site's node key.

    ``state`` is the SuperLink's (see :func:`medfed.transport.deploy.superlink_command`):
    ``sqlite`` for an aggregator that outlives restarts, ``memory`` for one that lives exactly
    as long as its federation (the demo, the benchmarks), free of SQLite's lock contention.

    Every run is logged to MLflow at ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<workspace>/mlflow.db``). A SQLite store is initialised here, once, before the
    SuperLink (and so any ServerApp) starts. Without MLflow installed runs are not tracked,
    unless ``tracking_uri`` asks for it: then that is an error.
    """
    check_superlink_port(workspace=workspace)  # a busy port costs nothing
    uri: str | None = resolve_tracking_uri(workspace_root=workspace.root, explicit=tracking_uri)
    env = {WORKSPACE_ENV: str(workspace.root)}
    if mlflow_available():
        assert uri is not None
        prepare_store(uri=uri)
        env[TRACKING_URI_ENV] = uri
    elif tracking_uri is not None:
        raise ConfigError(
            "--tracking-uri needs MLflow, which is not installed",
            hint="pip install 'medfed[tracking]'",
        )
    else:
        log.warning("MLflow is not installed: runs are not tracked (install medfed[tracking])")
        uri = None
    process = start_superlink(
        workspace=workspace,
        log_file=log_file or workspace.layout.logs / "superlink.log",
        env=env,
        flwr_home=workspace.layout.flwr_home,
        state=state,
    )
    try:
        registrations = register_sites(workspace=workspace, flwr_home=workspace.layout.flwr_home)
    except BaseException:
        process.stop(grace_s=5.0)
        raise
    return Aggregator(process=process, registrations=registrations, tracking_uri=uri)


def submit(*, workspace: Workspace, settings: RunSettings) -> int:
    """Submit a run of medfed's app with ``settings``; Flower's run id.

    The run's name is checked here too, so that a taken name is refused before Flower starts
    a ServerApp that would refuse it.
    """
    RunStore(paths=workspace.layout.run(settings.run_name)).check_name(settings)
    if not (workspace.layout.flwr_home / "config.toml").is_file():
        raise TransportError(
            f"no aggregator has been started for the workspace {workspace.root}",
            hint=f"start it first: medfed aggregator start --workspace {workspace.root}",
        )
    return submit_run(
        app_dir=medfed_app_directory(),
        flwr_home=workspace.layout.flwr_home,
        connection=DEFAULT_CONNECTION,
        run_config={RUN_CONFIG_KEY: settings.to_json()},
    )


def follow(
    *,
    workspace: Workspace,
    run_name: str,
    run_id: int,
    timeout_s: float,
    poll_s: float = 0.5,
    alive: Callable[[], None] | None = None,
) -> Iterator[RunEvent]:
    """Yield the run's events as they are written, until its last one.

    Only the events of Flower run ``run_id`` are yielded: earlier attempts under the same name (a
    resumed run) are skipped by the Flower run id their ``run_started`` names, so a run that
    ended before this is called is still read whole. ``alive`` is called while waiting; it
    raises to abort (e.g. when a process the caller watches died).
    """
    path = workspace.layout.run(run_name).events
    offset = 0
    ours = False
    ended: str | None = None  # Flower's final status, once it says the run is over
    deadline = time.monotonic() + timeout_s
    next_status = 0.0
    while True:
        events, offset = read_events(path, offset=offset)
        for event in events:
            if isinstance(event, RunStarted):
                ours = event.flower_run_id == run_id
            if not ours:
                continue
            yield event
            if isinstance(event, RunEnded):
                return
        if ended is not None:
            raise TransportError(
                f"Flower run {run_id} ended ({ended}) without finishing {run_name!r}",
                hint=f"see {workspace.layout.logs / 'superlink.log'} for the ServerApp's output",
            )
        now = time.monotonic()
        if now >= next_status:
            next_status = now + 5.0
            status = run_status(flwr_home=workspace.layout.flwr_home, run_id=run_id)
            if status.finished:
                # Read once more: the ServerApp may have written its last lines since.
                ended = f"{status.status}: {status.details or 'no details'}"
                continue
        if now >= deadline:
            raise TransportError(
                f"run {run_name!r} did not finish within {timeout_s:.0f} s",
                hint=f"it goes on at the aggregator; stop it with `flwr stop {run_id}`",
            )
        if alive is not None:
            alive()
        time.sleep(poll_s)
