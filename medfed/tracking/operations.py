"""Federation events as MLflow operations: pure translation, no MLflow call.

:class:`Translator` turns each :mod:`medfed.run_events` record into the operations that log it
(plain JSON-able dicts, so that the outbox can keep them on disk until MLflow takes them):

==================  ==========================================================================
event               operations
==================  ==========================================================================
RunStarted          a parent run ``<run_name>`` (params: the flattened settings; tags: versions,
                    app hash, sites (bounded: :func:`sites_tags`), strategy; artifacts: the
                    sites and the settings as JSON) and a child ``<run_name>/<site>`` per
                    site; with ``resume_from`` the runs the run had before are reopened
SiteUpdated         child metrics at ``step=round``: train_loss, dice_before, epsilon_spent,
                    epsilon_remaining, patients (one batch), and a tag per released number
                    naming its mechanism (``medfed.release.train_loss``: ``dp-sgd (std 0.1)``)
RoundDone           parent metrics at ``step=round``: dice_global, train_loss, epsilon_max,
                    round_seconds, bytes_moved, sites_answered (one batch)
SiteLevelPrivacy    parent metric ``site_level_epsilon`` at ``step=round`` and tags
                    ``medfed.site_level_delta`` / ``medfed.site_level_unit``: central DP's
                    epsilon, whose unit is a site, apart from the patient-level epsilons
Evaluation          ``dice_final`` on the parent and on each child
SiteDeclined ...    child tag ``medfed.last_issue``
PrivacyAlert        tag ``medfed.privacy_alert`` on the parent and the site's child run
RunEnded            parent tags, its description (``mlflow.note.content``: sites, rounds,
                    strategy, final Dice, each site's epsilon); the run's summary and report as
                    artifacts; the final model; every run terminated: FINISHED, KILLED
                    (stopped) or FAILED
==================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any, Final

from medfed.numbers import finite_or_none
from medfed.run_events import (
    SITE_ISSUES,
    Evaluation,
    PrivacyAlert,
    RoundDone,
    RunEnded,
    RunEvent,
    RunFailed,
    RunStarted,
    RunStopped,
    SiteLevelPrivacy,
    SiteRejected,
    SiteTimeout,
    SiteUpdated,
)
from medfed.tracking.descriptions import NOTE_TAG, run_description
from medfed.tracking.info import TrackingInfo

Operation = dict[str, Any]

# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH and MAX_PARAMS_TAGS_PER_BATCH
# (a test checks).
MAX_PARAM_LENGTH: Final = 6000
MAX_TAG_LENGTH: Final = 8000
MAX_PARAMS_PER_BATCH: Final = 100
# ``medfed.sites`` names the sites while they fit in this many characters (about 400 short
# ids); a larger federation's tag is its count and digest, its list the artifact below.
MAX_SITES_TAG_LENGTH: Final = 4000
SITES_ARTIFACT: Final = "medfed/sites.json"
SETTINGS_ARTIFACT: Final = "medfed/settings.json"
# A site's metrics, from its SiteUpdated event's fields; and its released numbers' tags.
SITE_METRICS: Final = {
    "loss": "train_loss",
    "dice_before": "dice_before",
    "epsilon_spent": "epsilon_spent",
    "patients": "patients",
}
RELEASE_TAGS: Final = {"loss": "train_loss", "dice_before": "dice_before", "patients": "patients"}


def status_of(event: RunEnded) -> str:
    """The MLflow status a run's last event ends its runs with."""
    if isinstance(event, RunFailed):
        return "FAILED"
    return "KILLED" if isinstance(event, RunStopped) else "FINISHED"


@dataclass
class Translator:
    """The translation's memory: which MLflow runs (by key) stand for the run and its sites."""

    parent_key: str | None = None
    site_keys: dict[str, str] = field(default_factory=dict)
    run_name: str = ""
    sites: list[str] = field(default_factory=list)
    strategy: str = ""
    rounds: int = 0
    # Child runs for the first ``child_runs`` sites only (None: every site); the parent run
    # names them all. A simulation of a thousand sites keeps the rest in tables.
    child_runs: int | None = None
    last_bytes: int = 0
    terminal: str | None = None

    def operations(self, event: RunEvent, *, reopen: TrackingInfo | None = None) -> list[Operation]:
        """What logs ``event``. ``reopen``: where a resumed run's runs are in MLflow."""
        if isinstance(event, RunStarted):
            return self._run_started(event, reopen)
        if self.parent_key is None:
            return []
        if isinstance(event, SiteUpdated):
            return self._site_update(event)
        if isinstance(event, RoundDone):
            return self._round_done(event)
        if isinstance(event, Evaluation):
            return self._evaluation(event)
        if isinstance(event, SiteLevelPrivacy):
            values = metrics(
                {"site_level_epsilon": event.site_level_epsilon}, step=event.round, ms=_ms(event)
            )
            tags = {
                "medfed.site_level_delta": str(event.delta),
                "medfed.site_level_unit": "site (central DP; not a patient-level epsilon)",
            }
            return [batch(self.parent_key, metrics=values, tags=tags)]
        if isinstance(event, SITE_ISSUES):
            return self._issue(event)
        if isinstance(event, PrivacyAlert):
            text = event.alert[:MAX_PARAM_LENGTH]
            keys = [self.parent_key, self.site_keys.get(event.site)]
            return [batch(key, tags={"medfed.privacy_alert": text}) for key in keys if key]
        if isinstance(event, RunEnded):
            return self.terminal_operations(event, artifacts=None)
        return []

    def _run_started(self, event: RunStarted, reopen: TrackingInfo | None) -> list[Operation]:
        self.run_name = event.run_name
        self.sites = list(event.sites)
        self.strategy = strategy_name(event.settings)
        self.rounds = event.rounds
        self.terminal = None
        self.last_bytes = 0
        ms = _ms(event)
        resume = event.resume_from
        if resume is not None and reopen is not None:
            self.parent_key = reopen.parent_key
            self.site_keys = dict(reopen.site_keys)
            keys = [
                self.parent_key,
                *(self.site_keys[s] for s in self.sites if s in self.site_keys),
            ]
            ops: list[Operation] = [{"op": "reopen", "key": key} for key in keys]
            tags = {"medfed.resumed_from": str(resume), **sites_tags(self.sites)}
            ops.append(batch(self.parent_key, tags=tags))
            ops.append(json_artifact(self.parent_key, SITES_ARTIFACT, list(self.sites)))
            return ops + self._new_sites(ms)
        if resume is not None and self.parent_key is not None:
            # The runs' creation is still queued from before the restart: continue with them.
            resumed = batch(self.parent_key, tags={"medfed.resumed_from": str(resume)})
            return [*self._new_sites(ms), resumed]
        self.parent_key = uuid.uuid4().hex
        self.site_keys = {}
        tags = parent_tags(run_name=self.run_name, sites=self.sites, settings=event.settings)
        if resume is not None:
            tags["medfed.resumed_from"] = str(resume)
        ops = [
            {
                "op": "create",
                "key": self.parent_key,
                "name": self.run_name,
                "tags": tags,
                "time_ms": ms,
            }
        ]
        params = sorted(flatten(event.settings).items())
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            ops.append(batch(self.parent_key, params=params[start : start + MAX_PARAMS_PER_BATCH]))
        # What a tag or a param cannot hold whole at any number of sites, as artifacts.
        ops.append(json_artifact(self.parent_key, SITES_ARTIFACT, list(self.sites)))
        ops.append(json_artifact(self.parent_key, SETTINGS_ARTIFACT, dict(event.settings)))
        return ops + self._new_sites(ms)

    def _new_sites(self, ms: int) -> list[Operation]:
        assert self.parent_key is not None
        ops: list[Operation] = []
        for site in self.sites if self.child_runs is None else self.sites[: self.child_runs]:
            if site in self.site_keys:
                continue
            key = self.site_keys[site] = uuid.uuid4().hex
            ops.append(
                {
                    "op": "create",
                    "key": key,
                    "parent": self.parent_key,
                    "site": site,
                    "name": f"{self.run_name}/{site}",
                    "tags": {"medfed.site_id": site, "medfed.run_name": self.run_name},
                    "time_ms": ms,
                }
            )
        return ops

    def _site_update(self, event: SiteUpdated) -> list[Operation]:
        key = self.site_keys.get(event.site)
        if key is None:
            return []
        values: dict[str, Any] = {
            name: getattr(event, attribute) for attribute, name in SITE_METRICS.items()
        }
        values["epsilon_remaining"] = event.epsilon_remaining
        tags = {
            f"medfed.release.{RELEASE_TAGS[name]}": note.describe()
            for name, note in event.releases.items()
            if name in RELEASE_TAGS
        }
        return [batch(key, metrics=metrics(values, step=event.round, ms=_ms(event)), tags=tags)]

    def _round_done(self, event: RoundDone) -> list[Operation]:
        assert self.parent_key is not None
        epsilons = [v for v in (finite_or_none(x) for x in event.epsilon.values()) if v is not None]
        moved = event.bytes_sent + event.bytes_received
        delta = moved - self.last_bytes if moved >= self.last_bytes else moved
        self.last_bytes = moved
        values = {
            "dice_global": event.dice_before,
            "train_loss": event.loss,
            "epsilon_max": max(epsilons) if epsilons else None,
            "round_seconds": event.seconds,
            "bytes_moved": delta,
            "sites_answered": event.sites_answered,
        }
        return [batch(self.parent_key, metrics=metrics(values, step=event.round, ms=_ms(event)))]

    def _evaluation(self, event: Evaluation) -> list[Operation]:
        assert self.parent_key is not None
        ms = _ms(event)
        ops = []
        overall = metrics({"dice_final": event.dice}, step=event.round, ms=ms)
        if overall:
            ops.append(batch(self.parent_key, metrics=overall))
        for site, dice in sorted(event.sites.items()):
            key = self.site_keys.get(site)
            values = metrics({"dice_final": dice}, step=event.round, ms=ms)
            if key is not None and values:
                ops.append(batch(key, metrics=values))
        return ops

    def _issue(self, event: RunEvent) -> list[Operation]:
        site = getattr(event, "site", None)
        key = self.site_keys.get(str(site))
        if key is None:
            return []
        if isinstance(event, SiteRejected):
            reason = "; ".join(event.reasons)
        elif isinstance(event, SiteTimeout):
            reason = f"no reply to {event.message_type}"
        else:
            reason = str(getattr(event, "reason", ""))
        text = f"{event.kind} (round {getattr(event, 'round', '-')}): {reason}"
        return [batch(key, tags={"medfed.last_issue": text[:MAX_PARAM_LENGTH]})]

    def terminal_operations(self, event: RunEnded, *, artifacts: str | None) -> list[Operation]:
        """Tags, the artifacts in directory ``artifacts`` (if any), the model, every run ended."""
        assert self.parent_key is not None
        self.terminal = event.kind
        status = status_of(event)
        summary = event.summary
        ms = _ms(event)
        tags = {
            "medfed.status": event.status,
            "medfed.reason": event.reason[:MAX_PARAM_LENGTH],
            NOTE_TAG: run_description(
                run_name=self.run_name,
                sites=self.sites,
                strategy=self.strategy,
                rounds_planned=self.rounds,
                status=event.status,
                reason=event.reason,
                summary=summary,
            ),
        }
        if summary is not None:
            tags["medfed.rounds_completed"] = str(summary.get("rounds_completed", ""))
        ops: list[Operation] = [batch(self.parent_key, tags=tags)]
        if artifacts is not None:
            ops.append({"op": "artifacts", "key": self.parent_key, "dir": artifacts})
        if summary is not None and summary.get("model"):
            ops.append(
                {
                    "op": "model",
                    "key": self.parent_key,
                    "checkpoint": str(summary["model"]),
                    "run_name": self.run_name,
                    "summary": json.loads(json.dumps(summary, default=str)),
                }
            )
        ops += [terminate(self.site_keys[s], status, ms) for s in self.sites if s in self.site_keys]
        ops.append(terminate(self.parent_key, status, ms))
        return ops

    def state(self) -> dict[str, Any]:
        return {
            "parent_key": self.parent_key,
            "site_keys": dict(self.site_keys),
            "run_name": self.run_name,
            "sites": list(self.sites),
            "strategy": self.strategy,
            "rounds": self.rounds,
            "terminal": self.terminal,
        }

    @classmethod
    def restored(cls, state: Mapping[str, Any]) -> Translator:
        return cls(
            parent_key=state.get("parent_key") or None,
            site_keys={str(k): str(v) for k, v in dict(state.get("site_keys") or {}).items()},
            run_name=str(state.get("run_name") or ""),
            sites=[str(s) for s in state.get("sites") or []],
            strategy=str(state.get("strategy") or ""),
            rounds=int(state.get("rounds") or 0),
            terminal=state.get("terminal") or None,
        )


def _ms(event: RunEvent) -> int:
    return int(event.time * 1000)


def metrics(values: Mapping[str, Any], *, step: int, ms: int) -> list[list[Any]]:
    """``[name, value, timestamp_ms, step]`` for every finite value (None and NaN skipped)."""
    return [
        [name, number, ms, step]
        for name, value in values.items()
        if (number := finite_or_none(value)) is not None
    ]


def batch(
    key: str,
    *,
    metrics: list[list[Any]] | None = None,
    params: Sequence[tuple[str, str]] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Operation:
    return {
        "op": "batch",
        "key": key,
        "metrics": metrics or [],
        "params": [list(p) for p in params or []],
        "tags": [[k, v] for k, v in (tags or {}).items()],
    }


def json_artifact(key: str, file: str, data: Any) -> Operation:
    """``data`` as the JSON artifact ``file`` of run ``key``."""
    return {"op": "json", "key": key, "file": file, "data": json.loads(json.dumps(data))}


def terminate(key: str, status: str, ms: int) -> Operation:
    return {"op": "terminate", "key": key, "status": status, "time_ms": ms}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: ``strategy.name`` = ``fedavg``; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        flat[name] = bounded(text, limit=MAX_PARAM_LENGTH, whole=SETTINGS_ARTIFACT)
    return flat


def bounded(text: str, *, limit: int, whole: str) -> str:
    """``text`` if it fits in ``limit`` characters; else its start, its length and digest.

    A value cut short says so, and where the whole of it is: a list of a thousand sites cut
    at a limit would read as a shorter, valid list.
    """
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    note = f"... (cut: {len(text)} characters, sha256 {digest}; the whole value: {whole})"
    return text[: limit - len(note)] + note


def sites_tags(sites: Sequence[str], *, limit: int = MAX_SITES_TAG_LENGTH) -> dict[str, str]:
    """``medfed.sites``, ``medfed.site_count`` and ``medfed.sites_sha256`` of a run's sites.

    ``medfed.sites`` is the comma-separated ids while they fit in ``limit`` characters (MLflow
    refuses a tag over 8,000, which about 700 sites reach), else ``<count> sites (sha256
    <digest>; the list: <artifact>)``. The digest is of the ids' JSON list, the artifact's
    content, so the list can be checked against the tag.
    """
    ids = [str(site) for site in sites]
    digest = hashlib.sha256(json.dumps(ids).encode("utf-8")).hexdigest()
    joined = ",".join(ids)
    if len(joined) > limit:
        joined = f"{len(ids)} sites (sha256 {digest}; the list: artifact {SITES_ARTIFACT})"
    return {
        "medfed.sites": joined,
        "medfed.site_count": str(len(ids)),
        "medfed.sites_sha256": digest,
    }


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def app_hash() -> str:
    """SHA-256 of the Flower app's ``pyproject.toml`` and medfed's version: what a run ships."""
    from medfed import __version__

    app = resources.files("medfed.transport") / "flwr_app" / "pyproject.toml"
    return hashlib.sha256(app.read_bytes() + __version__.encode("utf-8")).hexdigest()


def strategy_name(settings: Mapping[str, Any]) -> str:
    """The strategy's name in a run's settings (empty when they name none)."""
    strategy = settings.get("strategy")
    return str(strategy.get("name", "")) if isinstance(strategy, Mapping) else ""


def parent_tags(*, run_name: str, sites: list[str], settings: Mapping[str, Any]) -> dict[str, str]:
    from medfed import __version__

    return {
        "medfed.run_name": run_name,
        "medfed.version": __version__,
        "medfed.flwr": version("flwr"),
        "medfed.torch": version("torch"),
        "medfed.opacus": version("opacus"),
        "medfed.mlflow": version("mlflow"),
        **sites_tags(sites),
        "medfed.strategy": strategy_name(settings),
        "medfed.secure_aggregation": str(bool(settings.get("secure_aggregation"))).lower(),
        "medfed.distributed_noise": str(bool(settings.get("distributed_noise"))).lower(),
        "medfed.app_hash": app_hash(),
    }
