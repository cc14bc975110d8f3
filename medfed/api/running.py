"""Run a federation from Python: every site in this process, or submitted to a running aggregator.

:func:`run_federation` drives the real ServerApp round loop against the real ClientApp in one
process (:func:`medfed.transport.inprocess.run_in_process`): the same privacy ledgers, budget
checks, validation and MLflow tracking as a deployment, without the network. :func:`submit_run`
hands the same settings to an aggregator started with ``medfed aggregator start`` (or
:func:`medfed.transport.runner.start_aggregator`) and follows its events. Both return
:class:`~medfed.api.results.FederationResults`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.api.progress import showing_progress
from medfed.api.results import FederationResults, load_results
from medfed.api.sites import SyntheticSites
from medfed.config.run import RunSettings
from medfed.errors import ConfigError, TransportError
from medfed.run_events import EventCallback, RunEvent, RunFailed
from medfed.workspace import Workspace

if TYPE_CHECKING:
    from medfed.transport.processes import ProcessGroup

log = logging.getLogger("medfed.api")

SiteMap = Mapping[str, Path | str]


def _workspace(workspace: Path | str | Workspace) -> Workspace:
    from medfed.workspace import load_workspace

    if isinstance(workspace, Workspace):
        return workspace
    return load_workspace(Path(workspace).expanduser().absolute())


def _settings(settings: RunSettings) -> RunSettings:
    if not isinstance(settings, RunSettings):
        raise ConfigError(
            f"settings must be a medfed.RunSettings, not {type(settings).__name__}",
            hint="medfed.RunSettings(run_name='study-1', rounds=3, local_epochs=2, ...)",
        )
    return settings


def _tracking_uri(*, workspace: Workspace, track: bool, tracking_uri: str | None) -> str | None:
    from medfed.tracking.uri import mlflow_available, resolve_tracking_uri

    if not track:
        if tracking_uri is not None:
            raise ConfigError("tracking_uri was given with track=False", hint="drop one of them")
        return None
    if not mlflow_available():
        if tracking_uri is not None:
            raise ConfigError(
                "tracking_uri needs MLflow, which is not installed",
                hint="pip install 'medfed[tracking]'",
            )
        log.warning("MLflow is not installed: the run is not tracked")
        return None
    return resolve_tracking_uri(workspace_root=workspace.root, explicit=tracking_uri)


def run_federation(
    *,
    sites: SyntheticSites | SiteMap,
    settings: RunSettings,
    workspace: Path | str | Workspace | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    progress: bool | EventCallback = True,
) -> FederationResults:
    """Run a federation with every site in this process and return its results.

    ``sites``: synthetic sites (:func:`make_synthetic_sites`, which carry their workspace) or a
    mapping of site id to ``site.yaml`` path, together with the ``workspace`` that registers
    those sites. The run is logged to MLflow unless ``track`` is false: to ``tracking_uri``,
    else ``MLFLOW_TRACKING_URI``, else the workspace's ``mlflow.db``. ``progress``: True for
    a display that suits a terminal or a notebook, False for none, or a callable that gets
    every event (a frozen record of :mod:`medfed.run_events`). Each run name can be used once
    per workspace (``resume=True`` continues it).
    """
    from medfed.transport.inprocess import run_in_process

    settings = _settings(settings)
    if isinstance(sites, SyntheticSites):
        if workspace is not None and _workspace(workspace).root != sites.workspace.root:
            raise ConfigError(
                "the synthetic sites belong to another workspace than the one given",
                hint="leave out workspace= for synthetic sites",
            )
        ws, configs = sites.workspace, dict(sites.site_configs)
    else:
        if workspace is None:
            raise ConfigError(
                "site configurations need the workspace that registers their sites",
                hint="pass workspace= (the directory `medfed provision` made)",
            )
        ws = _workspace(workspace)
        configs = {str(site): Path(path).expanduser().absolute() for site, path in sites.items()}
    if not configs:
        raise ConfigError("no sites given", hint="pass at least one site configuration")
    uri = _tracking_uri(workspace=ws, track=track, tracking_uri=tracking_uri)
    with showing_progress(progress) as callback:
        run_in_process(
            workspace=ws,
            site_configs=configs,
            settings=settings,
            on_event=callback,
            tracking_uri=uri,
        )
    return load_results(workspace=ws.root, run_name=settings.run_name)


@dataclass(frozen=True)
class SubmittedRun:
    """A run handed to a running aggregator; :meth:`follow` waits for it and gets its results."""

    workspace: Path
    run_name: str
    flower_run_id: int

    def follow(
        self,
        *,
        progress: bool | EventCallback = True,
        timeout_s: float = 1800.0,
        tracking_wait_s: float = 180.0,
    ) -> FederationResults:
        """Show the run's events as they come, until its last one; then its results.

        After its last event the ServerApp still logs artifacts and the model to MLflow;
        this waits up to ``tracking_wait_s`` for it, so that MLflow is complete on return.
        Raises :class:`~medfed.errors.TransportError` when the run failed or took longer than
        ``timeout_s`` (it goes on at the aggregator then).
        """
        from medfed.transport.flwr_cli import wait_for_run
        from medfed.transport.runner import follow

        ws = _workspace(self.workspace)
        last: RunEvent | None = None
        with showing_progress(progress) as callback:
            for event in follow(
                workspace=ws,
                run_name=self.run_name,
                run_id=self.flower_run_id,
                timeout_s=timeout_s,
            ):
                last = event
                if callback is not None:
                    callback(event)
        if isinstance(last, RunFailed):
            raise TransportError(f"run {self.run_name!r} failed: {last.reason}")
        try:
            wait_for_run(
                flwr_home=ws.layout.flwr_home, run_id=self.flower_run_id, timeout_s=tracking_wait_s
            )
        except TransportError as exc:
            log.warning("the ServerApp did not end in time (%s); MLflow may be incomplete", exc)
        return load_results(workspace=ws.root, run_name=self.run_name)


def submit_run(*, workspace: Path | str | Workspace, settings: RunSettings) -> SubmittedRun:
    """Submit a run with ``settings`` to the aggregator running for ``workspace``.

    The sites train on their own machines; only the settings travel (the code is medfed's own
    Flower app). Call :meth:`SubmittedRun.follow` to watch it and get its results.
    """
    from medfed.transport.deploy import require_aggregator
    from medfed.transport.runner import submit

    ws = _workspace(workspace)
    settings = _settings(settings)
    require_aggregator(workspace=ws)
    run_id = submit(workspace=ws, settings=settings)
    return SubmittedRun(workspace=ws.root, run_name=settings.run_name, flower_run_id=run_id)


@dataclass(frozen=True, eq=False)
class LocalDeployment:
    """An aggregator and one site node per synthetic site, running on this machine."""

    workspace: Path
    group: ProcessGroup

    def stop(self) -> None:
        """Stop the site nodes and the aggregator (idempotent)."""
        self.group.stop()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_deployment(
    *, sites: SyntheticSites, tracking_uri: str | None = None
) -> LocalDeployment:
    """Start the real deployment of ``sites`` here: the aggregator, then a node per site.

    The processes are those of a real study (Flower SuperLink with TLS and node
    authentication, one SuperNode per site), so :func:`submit_run` works against them as
    against a remote aggregator. They are stopped by :meth:`LocalDeployment.stop`, by leaving
    a ``with`` block, and when this Python process exits. Runs are logged to MLflow at
    ``tracking_uri`` (default: the workspace's ``mlflow.db``).
    """
    import atexit

    from medfed.api.demo import start_site_nodes
    from medfed.transport.processes import ProcessGroup
    from medfed.transport.runner import start_aggregator

    group = ProcessGroup()
    atexit.register(group.stop)
    try:
        aggregator = start_aggregator(workspace=sites.workspace, tracking_uri=tracking_uri)
        group.add(aggregator.process)
        start_site_nodes(group=group, setup=sites)
    except BaseException:
        group.stop()
        raise
    return LocalDeployment(workspace=sites.workspace.root, group=group)
