"""Federation events to MLflow: one parent run per federation run, one child run per site.

:class:`FederationTracker` receives every event of
:func:`medfed.aggregator.federation.run_federation` through ``on_event`` and turns it into
MLflow operations (see :mod:`medfed.tracking.buffer` for how they are sent):

==================  ==========================================================================
event               MLflow
==================  ==========================================================================
run_started         parent run ``<run_name>`` (params: the flattened settings; tags: versions,
                    app hash, sites, strategy) and a child ``<run_name>/<site>`` per site;
                    ``<run dir>/mlflow.json`` says where they are. With ``resume_from`` the
                    runs of ``mlflow.json`` are reopened instead.
site_update         child metrics at ``step=round``: train_loss, dice_before, epsilon_spent,
                    epsilon_remaining, patients (one batch), and a tag per released number
                    naming its mechanism (``medfed.release.train_loss``: ``dp-sgd (std 0.1)``)
round_done          parent metrics at ``step=round``: dice_global, train_loss, epsilon_max,
                    round_seconds, bytes_moved, sites_answered (one batch)
evaluation          ``dice_final`` on the parent and on each child
site_declined ...   child tag ``medfed.last_issue``
privacy_alert       tag ``medfed.privacy_alert`` on the parent and the site's child run
run_finished ...    parent artifacts (ledgers as received, budget_state.json, summary.json,
                    audit/audit_report.html and .json,
                    plots), the final model (:mod:`medfed.tracking.model_log`), then every run
                    terminated: FINISHED (run_finished), KILLED (run_stopped), FAILED
                    (run_failed, or no last event before :meth:`close`)
==================  ==========================================================================

``on_event`` and ``close`` never raise: tracking must never break or stall a federation.
No MLflow run is ever made the process' active run; every call names its run id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.tracking.buffer import Operation, Outbox, PermanentError, RetryPolicy
from medfed.tracking.info import TrackingInfo, read_tracking_info, write_tracking_info
from medfed.tracking.uri import DEFAULT_EXPERIMENT, mlflow_available, open_store

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("medfed.tracking")

# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH and MAX_PARAMS_TAGS_PER_BATCH (a test checks).
MAX_PARAM_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
STAGING_DIR = "mlflow-staging"
TERMINAL_STATUS = {"run_finished": "FINISHED", "run_stopped": "KILLED", "run_failed": "FAILED"}
ISSUE_EVENTS = frozenset(
    {"site_declined", "site_rejected", "site_timeout", "site_exhausted", "evaluation_failed"}
)
SITE_METRICS = {
    "loss": "train_loss",
    "dice_before": "dice_before",
    "epsilon_spent": "epsilon_spent",
    "patients": "patients",
}
# The site_update release names, as the metrics they go with.
RELEASE_TAGS = {"loss": "train_loss", "dice_before": "dice_before", "patients": "patients"}


class FederationTracker:
    """Logs one federation run to MLflow from its events; see the module docstring."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        run_dir: Path,
        workspace_root: Path,
        experiment: str = DEFAULT_EXPERIMENT,
        timeout_s: float = 5.0,
    ) -> None:
        self._uri = tracking_uri
        self._run_dir = Path(run_dir)
        self._workspace_root = Path(workspace_root)
        self._experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._parent_key: str | None = None
        self._site_keys: dict[str, str] = {}
        self._run_name = ""
        self._sites: list[str] = []
        self._last_bytes = 0
        self._terminal: str | None = None
        self._closed = False
        self._outbox = Outbox(
            directory=self._run_dir,
            apply=self._apply,
            state=self._state,
            policy=RetryPolicy(timeout_s=timeout_s, retries=0),
        )
        try:
            self._restore(self._outbox.load())
        except Exception:
            log.exception("cannot read the MLflow operations left in %s", self._outbox.path)

    # Public API -----------------------------------------------------------------------------

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def pending(self) -> int:
        """Operations not yet accepted by MLflow (also in ``mlflow-pending.jsonl``)."""
        return len(self._outbox)

    def info(self) -> TrackingInfo | None:
        """Where the run is in MLflow, once its parent run exists."""
        return read_tracking_info(run_dir=self._run_dir)

    def on_event(self, event: dict[str, Any]) -> None:
        """Log one federation event. Never raises; a slow or dead store costs one timeout."""
        if self._closed:
            return
        try:
            ops = self._operations(event)
            if ops:
                self._outbox.add(*ops)
            self._outbox.flush(force=event.get("event") in TERMINAL_STATUS)
        except Exception:
            log.exception("MLflow tracking of event %s failed", event.get("event"))

    def close(self) -> None:
        """Send what is left, then end every run this tracker opened. Never raises.

        A run without a last event (the aggregator broke off) is ended FAILED. Whatever MLflow
        does not accept now stays in ``mlflow-pending.jsonl`` for the next tracker.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._parent_key is not None and self._terminal is None:
                event = {
                    "event": "run_failed",
                    "time": time.time(),
                    "reason": "the aggregator ended the run without a last event",
                }
                self._outbox.add(*self._terminal_operations(event))
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

    # Events to operations -------------------------------------------------------------------

    def _operations(self, event: Mapping[str, Any]) -> list[Operation]:
        kind = event.get("event")
        if kind == "run_started":
            return self._run_started(event)
        if self._parent_key is None:
            return []
        if kind == "site_update":
            return self._site_update(event)
        if kind == "round_done":
            return self._round_done(event)
        if kind == "evaluation":
            return self._evaluation(event)
        if kind in ISSUE_EVENTS:
            return self._issue(event)
        if kind == "privacy_alert":
            return self._alert(event)
        if kind in TERMINAL_STATUS:
            return self._terminal_operations(event)
        return []

    def _run_started(self, event: Mapping[str, Any]) -> list[Operation]:
        self._run_name = str(event.get("run_name", ""))
        self._sites = [str(s) for s in event.get("sites") or []]
        self._terminal = None
        self._last_bytes = 0
        settings = dict(event.get("settings") or {})
        ms = _ms(event)
        resume = event.get("resume_from")
        info = read_tracking_info(run_dir=self._run_dir) if resume is not None else None
        if info is not None and info.tracking_uri == self._uri and info.parent_key:
            return self._reopen(info, resume, ms)
        if resume is not None and self._parent_key is not None:
            # The runs' creation is still queued from before the restart: continue with them.
            resumed = _batch(self._parent_key, tags={"medfed.resumed_from": str(resume)})
            return [*self._new_sites(ms), resumed]
        self._parent_key = uuid.uuid4().hex
        self._site_keys = {}
        tags = _parent_tags(run_name=self._run_name, sites=self._sites, settings=settings)
        if resume is not None:
            tags["medfed.resumed_from"] = str(resume)
        ops: list[Operation] = [
            {
                "op": "create",
                "key": self._parent_key,
                "name": self._run_name,
                "tags": tags,
                "time_ms": ms,
            }
        ]
        params = sorted(_flatten(settings).items())
        size = MAX_PARAMS_PER_BATCH
        for start in range(0, len(params), size):
            ops.append(_batch(self._parent_key, params=params[start : start + size]))
        return ops + self._new_sites(ms)

    def _reopen(self, info: TrackingInfo, resume: Any, ms: int) -> list[Operation]:
        self._parent_key = info.parent_key
        self._site_keys = dict(info.site_keys)
        self._experiment_id = self._experiment_id or info.experiment_id
        self._run_ids.setdefault(info.parent_key, info.parent_run_id)
        for site, key in info.site_keys.items():
            if site in info.site_runs:
                self._run_ids.setdefault(key, info.site_runs[site])
        sites = [self._site_keys[s] for s in self._sites if s in self._site_keys]
        keys = [self._parent_key, *sites]
        ops: list[Operation] = [{"op": "reopen", "key": key} for key in keys]
        ops.append(_batch(self._parent_key, tags={"medfed.resumed_from": str(resume)}))
        return ops + self._new_sites(ms)

    def _new_sites(self, ms: int) -> list[Operation]:
        assert self._parent_key is not None
        ops: list[Operation] = []
        for site in self._sites:
            if site in self._site_keys:
                continue
            key = self._site_keys[site] = uuid.uuid4().hex
            ops.append(
                {
                    "op": "create",
                    "key": key,
                    "parent": self._parent_key,
                    "site": site,
                    "name": f"{self._run_name}/{site}",
                    "tags": {"medfed.site_id": site, "medfed.run_name": self._run_name},
                    "time_ms": ms,
                }
            )
        return ops

    def _site_update(self, event: Mapping[str, Any]) -> list[Operation]:
        key = self._site_keys.get(str(event.get("site")))
        step = event.get("round")
        if key is None or not isinstance(step, int):
            return []
        values = {name: event.get(field) for field, name in SITE_METRICS.items()}
        spent, cap = _number(event.get("epsilon_spent")), _number(event.get("epsilon_cap"))
        if spent is not None and cap is not None:
            values["epsilon_remaining"] = cap - spent
        tags = {
            f"medfed.release.{RELEASE_TAGS[name]}": _mechanism(release)
            for name, release in dict(event.get("releases") or {}).items()
            if name in RELEASE_TAGS and isinstance(release, Mapping)
        }
        return [_batch(key, metrics=_metrics(values, step=step, ms=_ms(event)), tags=tags)]

    def _round_done(self, event: Mapping[str, Any]) -> list[Operation]:
        assert self._parent_key is not None
        step = event.get("round")
        if not isinstance(step, int):
            return []
        values_in = (_number(x) for x in dict(event.get("epsilon") or {}).values())
        epsilons = [v for v in values_in if v is not None]
        moved = int(event.get("bytes_sent") or 0) + int(event.get("bytes_received") or 0)
        delta = moved - self._last_bytes if moved >= self._last_bytes else moved
        self._last_bytes = moved
        values = {
            "dice_global": event.get("dice_before"),
            "train_loss": event.get("loss"),
            "epsilon_max": max(epsilons) if epsilons else None,
            "round_seconds": event.get("seconds"),
            "bytes_moved": delta,
            "sites_answered": event.get("sites_answered"),
        }
        return [_batch(self._parent_key, metrics=_metrics(values, step=step, ms=_ms(event)))]

    def _evaluation(self, event: Mapping[str, Any]) -> list[Operation]:
        assert self._parent_key is not None
        step = event.get("round")
        if not isinstance(step, int):
            return []
        ms = _ms(event)
        ops = []
        metrics = _metrics({"dice_final": event.get("dice")}, step=step, ms=ms)
        if metrics:
            ops.append(_batch(self._parent_key, metrics=metrics))
        for site, dice in sorted(dict(event.get("sites") or {}).items()):
            key = self._site_keys.get(str(site))
            metrics = _metrics({"dice_final": dice}, step=step, ms=ms)
            if key is not None and metrics:
                ops.append(_batch(key, metrics=metrics))
        return ops

    def _issue(self, event: Mapping[str, Any]) -> list[Operation]:
        key = self._site_keys.get(str(event.get("site")))
        if key is None:
            return []
        reason = event.get("reason")
        if reason is None and event.get("reasons"):
            reason = "; ".join(str(r) for r in event["reasons"])
        if reason is None:
            reason = f"no reply to {event.get('message_type', 'a request')}"
        text = f"{event.get('event')} (round {event.get('round', '-')}): {reason}"
        return [_batch(key, tags={"medfed.last_issue": text[:MAX_PARAM_LENGTH]})]

    def _alert(self, event: Mapping[str, Any]) -> list[Operation]:
        assert self._parent_key is not None
        text = str(event.get("alert", ""))[:MAX_PARAM_LENGTH]
        keys = [self._parent_key, self._site_keys.get(str(event.get("site")))]
        return [_batch(key, tags={"medfed.privacy_alert": text}) for key in keys if key]

    def _terminal_operations(self, event: Mapping[str, Any]) -> list[Operation]:
        assert self._parent_key is not None
        kind = str(event.get("event"))
        self._terminal = kind
        status = TERMINAL_STATUS[kind]
        summary = event.get("summary") if isinstance(event.get("summary"), dict) else None
        ms = _ms(event)
        tags = {
            "medfed.status": str(event.get("status") or kind.removeprefix("run_")),
            "medfed.reason": str(event.get("reason", ""))[:MAX_PARAM_LENGTH],
        }
        if summary is not None:
            tags["medfed.rounds_completed"] = str(summary.get("rounds_completed", ""))
        ops: list[Operation] = [_batch(self._parent_key, tags=tags)]
        staged = self._stage_artifacts(kind=kind, ms=ms, summary=summary)
        if staged is not None:
            ops.append({"op": "artifacts", "key": self._parent_key, "dir": str(staged)})
        if summary is not None and summary.get("model"):
            ops.append(
                {
                    "op": "model",
                    "key": self._parent_key,
                    "checkpoint": str(summary["model"]),
                    "run_name": self._run_name,
                    "summary": json.loads(json.dumps(summary, default=str)),
                }
            )
        for site in self._sites:
            if site in self._site_keys:
                ops.append(_terminate(self._site_keys[site], status, ms))
        ops.append(_terminate(self._parent_key, status, ms))
        return ops

    def _stage_artifacts(
        self, *, kind: str, ms: int, summary: Mapping[str, Any] | None
    ) -> Path | None:
        """Copy what the parent run keeps into a directory that lives until it is sent."""
        staged = self._run_dir / STAGING_DIR / f"{kind}-{ms}"
        try:
            staged.mkdir(parents=True, exist_ok=True)
            ledgers = self._workspace_root / "ledgers"
            for site in self._sites:
                ledger = ledgers / f"{site}.ledger.jsonl"
                if ledger.is_file():
                    (staged / "ledgers").mkdir(exist_ok=True)
                    shutil.copyfile(ledger, staged / "ledgers" / ledger.name)
            if summary is not None:
                _write_json(staged / "summary.json", summary)
                _write_json(staged / "budget_state.json", summary.get("budgets") or {})
            self._write_plots(staged / "plots")
            self._write_audit_report(staged / "audit")
        except Exception:
            log.exception("cannot prepare the run's MLflow artifacts in %s", staged)
            return None
        return staged

    def _write_audit_report(self, directory: Path) -> None:
        """The auditor's report of this run, as it stands at the run's end (HTML and JSON)."""
        from medfed.audit import build_report

        try:
            report = build_report(workspace=self._workspace_root, run_name=self._run_name)
        except Exception:
            log.exception("cannot build the audit report of run %s", self._run_name)
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "audit_report.html").write_text(report.to_html(), encoding="utf-8")
        (directory / "audit_report.json").write_text(report.to_json_text(), encoding="utf-8")

    def _write_plots(self, directory: Path) -> None:
        from medfed.aggregator.run_store import EVENTS_FILE, read_events
        from medfed.tracking.plots import series_from_events, write_plots

        try:
            events, _ = read_events(self._run_dir / EVENTS_FILE)
            write_plots(
                series=series_from_events(events), directory=directory, title=self._run_name
            )
        except ImportError:
            log.warning("matplotlib is not installed: the run is logged without plots")

    # Operations to MLflow ---------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "tracking_uri": self._uri,
            "experiment_id": self._experiment_id,
            "run_ids": dict(self._run_ids),
            "parent_key": self._parent_key,
            "site_keys": dict(self._site_keys),
            "run_name": self._run_name,
            "sites": list(self._sites),
            "terminal": self._terminal,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("tracking_uri") == self._uri:
            self._run_ids = {str(k): str(v) for k, v in dict(state.get("run_ids") or {}).items()}
            self._experiment_id = state.get("experiment_id") or None
        self._parent_key = state.get("parent_key") or None
        self._site_keys = {str(k): str(v) for k, v in dict(state.get("site_keys") or {}).items()}
        self._run_name = str(state.get("run_name") or "")
        self._sites = [str(s) for s in state.get("sites") or []]
        self._terminal = state.get("terminal") or None

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
        if self._parent_key is None or self._parent_key not in self._run_ids:
            return
        write_tracking_info(
            run_dir=self._run_dir,
            info=TrackingInfo(
                tracking_uri=self._uri,
                experiment_id=experiment_id,
                parent_run_id=self._run_ids[self._parent_key],
                site_runs={
                    site: self._run_ids[key]
                    for site, key in self._site_keys.items()
                    if key in self._run_ids
                },
                run_name=self._run_name,
                parent_key=self._parent_key,
                site_keys=dict(self._site_keys),
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
    workspace_root: Path,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 5.0,
) -> Iterator[Callable[[dict[str, Any]], None] | None]:
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
    tracker = FederationTracker(
        tracking_uri=tracking_uri,
        run_dir=run_dir,
        workspace_root=workspace_root,
        timeout_s=timeout_s,
    )

    def both(event: dict[str, Any]) -> None:
        tracker.on_event(event)
        if on_event is not None:
            on_event(event)

    try:
        yield both
    finally:
        tracker.close()


# Helpers ------------------------------------------------------------------------------------


def _ms(event: Mapping[str, Any]) -> int:
    value = event.get("time")
    return int(float(value) * 1000) if isinstance(value, int | float) else int(time.time() * 1000)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mechanism(release: Mapping[str, Any]) -> str:
    """``gaussian (std 0.12)``, ``dp-sgd (std 0.3)``, ``public``."""
    mechanism = str(release.get("mechanism", "unknown"))
    std = _number(release.get("noise_std"))
    return mechanism if std is None else f"{mechanism} (std {std:.3g})"


def _metrics(values: Mapping[str, Any], *, step: int, ms: int) -> list[list[Any]]:
    """``[name, value, timestamp_ms, step]`` for every finite value (None and NaN skipped)."""
    return [
        [name, number, ms, step]
        for name, value in values.items()
        if (number := _number(value)) is not None
    ]


def _batch(
    key: str,
    *,
    metrics: list[list[Any]] | None = None,
    params: list[tuple[str, str]] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Operation:
    return {
        "op": "batch",
        "key": key,
        "metrics": metrics or [],
        "params": [list(p) for p in params or []],
        "tags": [[k, v] for k, v in (tags or {}).items()],
    }


def _terminate(key: str, status: str, ms: int) -> Operation:
    return {"op": "terminate", "key": key, "status": status, "time_ms": ms}


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``strategy.name`` = ``fedavg``; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def app_hash() -> str:
    """SHA-256 of the Flower app's ``pyproject.toml`` and medfed's version: what a run ships."""
    from medfed import __version__

    app = resources.files("medfed.transport") / "flwr_app" / "pyproject.toml"
    return hashlib.sha256(app.read_bytes() + __version__.encode("utf-8")).hexdigest()


def _parent_tags(*, run_name: str, sites: list[str], settings: Mapping[str, Any]) -> dict[str, str]:
    from medfed import __version__

    strategy = settings.get("strategy")
    return {
        "medfed.run_name": run_name,
        "medfed.version": __version__,
        "medfed.flwr": _version("flwr"),
        "medfed.torch": _version("torch"),
        "medfed.opacus": _version("opacus"),
        "medfed.mlflow": _version("mlflow"),
        "medfed.sites": ",".join(sites),
        "medfed.strategy": str(strategy.get("name", "")) if isinstance(strategy, Mapping) else "",
        "medfed.app_hash": app_hash(),
    }


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    path.write_text(text, encoding="utf-8")
