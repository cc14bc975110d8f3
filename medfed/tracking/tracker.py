"""Federation events to MLflow: one parent run per federation run, one child run per site.

:class:`FederationTracker` receives every event of
:func:`medfed.aggregator.federation.run_federation` through ``on_event``, turns it into MLflow
operations (:mod:`medfed.tracking.operations`) and sends them through its outbox
(:mod:`medfed.tracking.buffer`): what MLflow does not take now is kept on disk and sent later.
At a run's last event the run's summary and report (written by the aggregator's finish step,
:mod:`medfed.aggregator.finish`) become the parent run's artifacts, and the final model is
logged and registered (:mod:`medfed.tracking.model_log`).

``on_event`` and ``close`` never raise: tracking must never break or stall a federation.
No MLflow run is ever made the process' active run; every call names its run id.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.logs import redact_secrets
from medfed.run_events import EventCallback, RunEnded, RunEvent, RunFailed, RunStarted
from medfed.tracking.buffer import Outbox, PermanentError, RetryPolicy
from medfed.tracking.info import TrackingInfo, read_tracking_info, write_tracking_info
from medfed.tracking.operations import Operation, Translator
from medfed.tracking.uri import DEFAULT_EXPERIMENT, mlflow_available, open_store
from medfed.workspace import RunPaths

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("medfed.tracking")


class FederationTracker:
    """Logs one federation run to MLflow from its events; see the module docstring."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        run_dir: Path,
        experiment: str = DEFAULT_EXPERIMENT,
        timeout_s: float = 5.0,
        child_runs: int | None = None,
    ) -> None:
        """``child_runs``: how many of the run's sites get a child run (None: all of them)."""
        self._uri = tracking_uri
        self._child_runs = child_runs
        self._paths = RunPaths(directory=Path(run_dir))
        self._experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._translator = Translator(child_runs=child_runs)
        self._closed = False
        self._outbox = Outbox(
            paths=self._paths,
            apply=self._apply,
            state=self._state,
            policy=RetryPolicy(timeout_s=timeout_s, retries=0),
        )
        try:
            self._restore(self._outbox.load())
        except Exception:
            log.exception("cannot read the MLflow operations left in %s", self._outbox.path)

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def pending(self) -> int:
        """Operations not yet accepted by MLflow (also in ``mlflow-pending.jsonl``)."""
        return len(self._outbox)

    def info(self) -> TrackingInfo | None:
        """Where the run is in MLflow, once its parent run exists."""
        return read_tracking_info(paths=self._paths)

    def on_event(self, event: RunEvent) -> None:
        """Log one federation event. Never raises; a slow or dead store costs one timeout."""
        if self._closed:
            return
        try:
            ops = self._operations(event)
            if ops:
                self._outbox.add(*ops)
            self._outbox.flush(force=isinstance(event, RunEnded))
        except Exception:
            log.exception("MLflow tracking of event %s failed", event.kind)

    def close(self) -> None:
        """Send what is left, then end every run this tracker opened. Never raises.

        A run without a last event (the aggregator broke off) is ended FAILED. Whatever MLflow
        does not accept now stays in ``mlflow-pending.jsonl`` for the next tracker.
        """
        if self._closed:
            return
        self._closed = True
        try:
            translator = self._translator
            if translator.parent_key is not None and translator.terminal is None:
                failed = RunFailed(
                    run_name=translator.run_name,
                    reason="the aggregator ended the run without a last event",
                )
                self._outbox.add(*self._operations(failed))
            self._outbox.flush(force=True)
            if len(self._outbox):
                log.warning(
                    "%d MLflow operations could not be sent to %s; they are kept in %s and sent "
                    "by the next tracker of this run (e.g. on --resume)",
                    len(self._outbox),
                    self._uri,
                    self._outbox.path,
                )
        except Exception:
            log.exception("closing the MLflow tracker failed")

    def _operations(self, event: RunEvent) -> list[Operation]:
        if isinstance(event, RunStarted):
            return self._translator.operations(event, reopen=self._reopening(event))
        if isinstance(event, RunEnded) and self._translator.parent_key is not None:
            staged = self._stage_artifacts(event)
            return self._translator.terminal_operations(
                event, artifacts=None if staged is None else str(staged)
            )
        return self._translator.operations(event)

    def _reopening(self, event: RunStarted) -> TrackingInfo | None:
        """Where a resumed run's MLflow runs are, adopted as this tracker's own."""
        if event.resume_from is None:
            return None
        info = read_tracking_info(paths=self._paths)
        if info is None or info.tracking_uri != redact_secrets(self._uri) or not info.parent_key:
            return None
        self._experiment_id = self._experiment_id or info.experiment_id
        self._run_ids.setdefault(info.parent_key, info.parent_run_id)
        for site, key in info.site_keys.items():
            if site in info.site_runs:
                self._run_ids.setdefault(key, info.site_runs[site])
        return info

    def _stage_artifacts(self, event: RunEnded) -> Path | None:
        """Copy the run's summary and report into a directory that lives until it is sent."""
        staged = self._paths.mlflow_staging / f"{event.kind}-{int(event.time * 1000)}"
        try:
            staged.mkdir(parents=True, exist_ok=True)
            if self._paths.report.is_dir():
                shutil.copytree(self._paths.report, staged, dirs_exist_ok=True)
            if self._paths.summary.is_file():
                shutil.copyfile(self._paths.summary, staged / self._paths.summary.name)
        except OSError:
            log.exception("cannot prepare the run's MLflow artifacts in %s", staged)
            return None
        return staged

    # Operations to MLflow ---------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            # the outbox and the run's files keep where, never the password
            "tracking_uri": redact_secrets(self._uri),
            "experiment_id": self._experiment_id,
            "run_ids": dict(self._run_ids),
            **self._translator.state(),
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("tracking_uri") == redact_secrets(self._uri):
            self._run_ids = {str(k): str(v) for k, v in dict(state.get("run_ids") or {}).items()}
            self._experiment_id = state.get("experiment_id") or None
        self._translator = Translator.restored(state)
        self._translator.child_runs = self._child_runs

    def _open(self) -> tuple[MlflowClient, str]:
        if self._client is None or self._experiment_id is None:
            self._client, self._experiment_id = open_store(
                uri=self._uri, experiment=self._experiment
            )
        return self._client, self._experiment_id

    def _run_id(self, key: str) -> str:
        run_id = self._run_ids.get(key)
        if run_id is None:
            raise PermanentError(f"run {key} was never created in MLflow")
        return run_id

    def _apply(self, op: Operation) -> None:
        client, experiment_id = self._open()
        kind = op["op"]
        if kind == "create":
            self._create(client, experiment_id, op)
        elif kind == "reopen":
            client.update_run(self._run_id(op["key"]), status="RUNNING")
        elif kind == "batch":
            self._log_batch(client, op)
        elif kind == "artifacts":
            client.log_artifacts(self._run_id(op["key"]), op["dir"])
            shutil.rmtree(op["dir"], ignore_errors=True)
            with contextlib.suppress(OSError):  # the staging directory, once empty
                Path(op["dir"]).parent.rmdir()
        elif kind == "json":
            client.log_dict(self._run_id(op["key"]), op["data"], op["file"])
        elif kind == "model":
            self._log_model(client, experiment_id, op)
        elif kind == "terminate":
            client.set_terminated(
                self._run_id(op["key"]), status=op["status"], end_time=op.get("time_ms")
            )
        else:
            raise PermanentError(f"unknown tracking operation {kind!r}")

    def _create(self, client: MlflowClient, experiment_id: str, op: Operation) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        key = str(op["key"])
        if key in self._run_ids:
            return
        tags = {**dict(op.get("tags") or {}), "medfed.tracking_key": key}
        if op.get("parent"):
            tags[MLFLOW_PARENT_RUN_ID] = self._run_id(str(op["parent"]))
        found: list[Any] = []
        if op.get("attempts"):  # an earlier try may have created it before timing out
            found = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`medfed.tracking_key` = '{key}'",
                max_results=1,
            )
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(
                experiment_id, start_time=op.get("time_ms"), tags=tags, run_name=str(op["name"])
            )
            run_id = run.info.run_id
        self._run_ids[key] = run_id
        self._write_info(experiment_id)

    def _write_info(self, experiment_id: str) -> None:
        translator = self._translator
        parent = translator.parent_key
        if parent is None or parent not in self._run_ids:
            return
        write_tracking_info(
            paths=self._paths,
            info=TrackingInfo(
                tracking_uri=redact_secrets(self._uri),
                experiment_id=experiment_id,
                parent_run_id=self._run_ids[parent],
                site_runs={
                    site: self._run_ids[key]
                    for site, key in translator.site_keys.items()
                    if key in self._run_ids
                },
                run_name=translator.run_name,
                parent_key=parent,
                site_keys=dict(translator.site_keys),
            ),
        )

    def _log_batch(self, client: MlflowClient, op: Operation) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._run_id(str(op["key"]))
        client.log_batch(
            run_id,
            metrics=[
                Metric(key=k, value=float(v), timestamp=int(ts), step=int(step))
                for k, v, ts, step in op.get("metrics") or []
            ],
            params=[Param(k, v) for k, v in op.get("params") or []],
            tags=[RunTag(k, v) for k, v in op.get("tags") or []],
            synchronous=True,
        )

    def _log_model(self, client: MlflowClient, experiment_id: str, op: Operation) -> None:
        from medfed.tracking.model_log import log_final_model

        version = log_final_model(
            client=client,
            tracking_uri=self._uri,
            experiment_id=experiment_id,
            run_id=self._run_id(str(op["key"])),
            checkpoint=Path(op["checkpoint"]),
            summary=op["summary"],
            run_name=str(op["run_name"]),
            retry=bool(op.get("attempts")),
        )
        log.info(
            "final model registered as %s version %s (%s)",
            version.name,
            version.version,
            version.model_format,
        )


@contextmanager
def tracking(
    *,
    tracking_uri: str | None,
    run_dir: Path,
    on_event: EventCallback | None = None,
    timeout_s: float = 5.0,
) -> Iterator[EventCallback | None]:
    """``on_event`` with a tracker in front of it (closed on exit); unchanged without a URI.

    Without MLflow installed the run is not tracked (a warning says so).
    """
    if tracking_uri is None:
        yield on_event
        return
    if not mlflow_available():
        log.warning("MLflow is not installed: run not tracked (install medfed[tracking])")
        yield on_event
        return
    tracker = FederationTracker(tracking_uri=tracking_uri, run_dir=run_dir, timeout_s=timeout_s)

    def both(event: RunEvent) -> None:
        tracker.on_event(event)
        if on_event is not None:
            on_event(event)

    try:
        yield both
    finally:
        tracker.close()
