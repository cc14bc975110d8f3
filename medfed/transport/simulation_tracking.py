"""MLflow for a simulation of many sites: one parent run, a table of every site's metrics.

The deployment's tracker (:class:`medfed.tracking.tracker.FederationTracker`) makes one child
run per site and one MLflow call per site and round. At hundreds of sites that is thousands of
runs nobody can read in the UI and minutes of calls. A simulation keeps the parent run exactly
as the deployment logs it (settings, per-round metrics, report, final model) and changes two
things:

* child runs only for the first ``child_runs`` sites (:data:`DEFAULT_CHILD_RUNS`), so a few
  sites' curves stay one click away;
* every site's metrics of a round go into one table, ``site_metrics/round-NNNN.csv`` (site,
  status, train_loss, dice_before, epsilon_spent, epsilon_remaining, patients, issue), uploaded
  as an artifact of the parent run in one call, with their spread across the sites as batched
  parent metrics at ``step=round``: ``sites_<metric>_min``, ``_mean``, ``_max``;
  ``site_metrics/evaluation.csv`` holds each site's final Dice.

The tables are written to the run's directory first (``site-metrics/``) and sent through an
:class:`~medfed.tracking.buffer.Outbox` of their own, so a slow or dead MLflow costs the
simulation what it costs a deployment: one short timeout now and then, never the run.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from medfed.run_events import (
    Evaluation,
    EvaluationFailed,
    EventCallback,
    RoundDone,
    RunEvent,
    RunStarted,
    SiteDeclined,
    SiteRejected,
    SiteTimeout,
    SiteUpdated,
)
from medfed.workspace import RunPaths

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from medfed.tracking.buffer import Operation, Outbox
    from medfed.tracking.tracker import FederationTracker

log = logging.getLogger("medfed.simulation")

DEFAULT_CHILD_RUNS: Final = 10
TABLE_DIR: Final = "site-metrics"
ARTIFACT_DIR: Final = "site_metrics"
COLUMNS: Final = (
    "site",
    "status",
    "train_loss",
    "dice_before",
    "epsilon_spent",
    "epsilon_remaining",
    "patients",
    "issue",
)
SPREAD: Final = ("train_loss", "dice_before", "epsilon_spent", "epsilon_remaining")


def round_table(directory: Path, round_index: int) -> Path:
    """Where the table of one round's site metrics is written."""
    return directory / TABLE_DIR / f"round-{round_index:04d}.csv"


class SiteMetrics:
    """Every site's metrics of the current round, as rows of one table."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def add(self, event: RunEvent) -> None:
        if isinstance(event, SiteUpdated):
            remaining = None
            if event.epsilon_spent is not None and event.epsilon_cap is not None:
                remaining = max(event.epsilon_cap - event.epsilon_spent, 0.0)
            self.rows[event.site] = {
                "site": event.site,
                "status": "updated",
                "train_loss": event.loss,
                "dice_before": event.dice_before,
                "epsilon_spent": event.epsilon_spent,
                "epsilon_remaining": remaining,
                "patients": event.patients,
                "issue": "",
            }
        elif isinstance(event, SiteDeclined | SiteRejected | SiteTimeout):
            if isinstance(event, SiteDeclined):
                issue = f"{event.code}: {event.reason}"
            elif isinstance(event, SiteRejected):
                issue = "; ".join(event.reasons)
            else:
                issue = f"no reply to {event.message_type}"
            self.rows[event.site] = {"site": event.site, "status": event.kind, "issue": issue}

    def spread(self, *, step: int, ms: int) -> list[list[Any]]:
        """``sites_<metric>_min/_mean/_max`` over the sites that reported the metric."""
        out: list[list[Any]] = []
        for name in SPREAD:
            values = [
                float(v)
                for row in self.rows.values()
                if isinstance(v := row.get(name), int | float) and math.isfinite(v)
            ]
            if values:
                for stat, value in (
                    ("min", min(values)),
                    ("mean", sum(values) / len(values)),
                    ("max", max(values)),
                ):
                    out.append([f"sites_{name}_{stat}", value, ms, step])
        return out

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for site in sorted(self.rows):
                writer.writerow({k: _cell(self.rows[site].get(k)) for k in COLUMNS})
        self.rows = {}
        return path


def _cell(value: Any) -> Any:
    return "" if value is None else value


class SimulationTracker:
    """The deployment's tracker with fewer child runs, and the sites' tables beside it."""

    def __init__(self, *, tracking_uri: str, run_dir: Path, sites: int, child_runs: int) -> None:
        from medfed.tracking.buffer import Outbox, RetryPolicy
        from medfed.tracking.tracker import FederationTracker

        self._uri = tracking_uri
        self._run_dir = Path(run_dir)
        self._sites = sites
        self._child_runs = child_runs
        self.tracker: FederationTracker = FederationTracker(
            tracking_uri=tracking_uri, run_dir=self._run_dir, child_runs=child_runs
        )
        self._metrics = SiteMetrics()
        self._client: MlflowClient | None = None
        self._outbox: Outbox = Outbox(
            paths=RunPaths(directory=self._run_dir / TABLE_DIR),
            apply=self._apply,
            state=dict,
            policy=RetryPolicy(),
        )
        self._outbox.load()
        self.seconds = 0.0  # spent logging to MLflow (the tracker's calls and the tables')

    def on_event(self, event: RunEvent) -> None:
        """Log ``event``: never raises (tracking must never stop a simulation)."""
        started = time.perf_counter()
        try:
            self.tracker.on_event(event)
            self._collect(event)
            self._flush(force=False)
        except Exception:
            log.exception("MLflow tracking of event %s failed", event.kind)
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:
        started = time.perf_counter()
        try:
            self.tracker.close()
            self._flush(force=True)
        except Exception:
            log.exception("closing the simulation's MLflow tracking failed")
        finally:
            self.seconds += time.perf_counter() - started

    def _collect(self, event: RunEvent) -> None:
        ms = int(event.time * 1000)
        if isinstance(event, RunStarted):
            tags = {
                "medfed.simulation.sites": str(self._sites),
                "medfed.simulation.child_runs": str(min(self._child_runs, self._sites)),
            }
            self._outbox.add({"op": "batch", "metrics": [], "tags": sorted(tags.items())})
        elif isinstance(event, RoundDone):
            spread = self._metrics.spread(step=event.round, ms=ms)
            table = self._metrics.write(round_table(self._run_dir, event.round))
            self._outbox.add(
                {"op": "table", "file": str(table)},
                {"op": "batch", "metrics": spread, "tags": []},
            )
        elif isinstance(event, Evaluation | EvaluationFailed):
            self._evaluation(event)
        else:
            self._metrics.add(event)

    def _evaluation(self, event: Evaluation | EvaluationFailed) -> None:
        path = self._run_dir / TABLE_DIR / "evaluation.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            if new:
                writer.writerow(["site", "dice_final", "issue"])
            if isinstance(event, Evaluation):
                for site, dice in sorted(event.sites.items()):
                    writer.writerow([site, _cell(dice), ""])
                self._outbox.add({"op": "table", "file": str(path)})
            else:
                writer.writerow([event.site, "", event.reason])

    def _flush(self, *, force: bool) -> None:
        # The tables belong to the parent run: wait until the tracker has created it.
        if self.tracker.pending == 0 and self._parent_run() is not None:
            self._outbox.flush(force=force)

    def _parent_run(self) -> str | None:
        info = self.tracker.info()
        return None if info is None else info.parent_run_id

    def _apply(self, op: Operation) -> None:
        from mlflow.entities import Metric, RunTag

        from medfed.tracking.buffer import PermanentError
        from medfed.tracking.uri import open_store

        run_id = self._parent_run()
        if run_id is None:
            raise PermanentError("the simulation's parent run was never created in MLflow")
        if self._client is None:
            self._client = open_store(uri=self._uri)[0]
        if op["op"] == "table":
            self._client.log_artifact(run_id, op["file"], ARTIFACT_DIR)
        else:
            self._client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op["metrics"]],
                tags=[RunTag(k, v) for k, v in op["tags"]],
                synchronous=True,
            )


class TrackedEvents:
    """The events' way to MLflow (when tracked) and then on to ``on_event``."""

    def __init__(self, *, tracker: SimulationTracker | None, on_event: EventCallback | None):
        self.tracker = tracker
        self._next = on_event

    @property
    def seconds(self) -> float:
        """Time spent logging to MLflow."""
        return 0.0 if self.tracker is None else self.tracker.seconds

    def on_event(self, event: RunEvent) -> None:
        if self.tracker is not None:
            self.tracker.on_event(event)
        if self._next is not None:
            self._next(event)


@contextmanager
def simulation_tracking(
    *,
    tracking_uri: str | None,
    run_dir: Path,
    sites: int,
    child_runs: int | None = None,
    on_event: EventCallback | None = None,
) -> Iterator[TrackedEvents]:
    """The simulation's tracking while the block runs (closed on exit; none without a URI)."""
    from medfed.tracking.uri import mlflow_available, prepare_store

    tracker = None
    if tracking_uri is not None:
        if mlflow_available():
            prepare_store(uri=tracking_uri)
            tracker = SimulationTracker(
                tracking_uri=tracking_uri,
                run_dir=run_dir,
                sites=sites,
                child_runs=DEFAULT_CHILD_RUNS if child_runs is None else child_runs,
            )
        else:
            log.warning(
                "MLflow is not installed: simulation not tracked (install medfed[tracking])"
            )
    try:
        yield TrackedEvents(tracker=tracker, on_event=on_event)
    finally:
        if tracker is not None:
            tracker.close()
