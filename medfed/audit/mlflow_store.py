"""Reading what a federation run logged to MLflow: each site's epsilon, and registered models.

Optional: MLflow is imported only here and only when a run names a tracking store
(``mlflow.json`` in the run's directory, or ``--tracking-uri``/``--mlflow-run``). Nothing is
written to the store, and a SQLite store that does not exist is never created. Requests to a
tracking server use short timeouts and no retries, so a dead server cannot stall an audit.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from medfed.audit.sources import RunRecord

METRIC: Final = "epsilon_spent"
SITES_TAG: Final = "medfed.sites"
SITE_COUNT_TAG: Final = "medfed.site_count"
EPSILON_TAG_PREFIX: Final = "medfed.epsilon."
# A simulation's per-round site tables on the parent run, and their site column
# (medfed.transport.simulation_tracking.ARTIFACT_DIR and COLUMNS; a test checks).
SITE_TABLES: Final = "site_metrics"
SITE_COLUMN: Final = "site"
ROUND_TABLE: Final = re.compile(r"round-(\d+)\.csv")
_SQLITE: Final = "sqlite:///"
_QUIET_ENV: Final = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class MlflowTarget:
    """Where one federation run was tracked."""

    tracking_uri: str
    parent_run_id: str | None
    site_runs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelVersion:
    """One version of a registered model."""

    name: str
    version: str
    source: str
    run_id: str | None
    sites: tuple[str, ...]
    tags: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "run_id": self.run_id,
            "sites": list(self.sites),
            "tags": dict(self.tags),
        }


def mlflow_missing() -> str | None:
    """Why MLflow cannot be used here, or None when it can be imported."""
    if importlib.util.find_spec("mlflow") is None:
        return "mlflow is not installed (pip install 'medfed[tracking]')"
    return None


def resolve_target(
    *, run: RunRecord, tracking_uri: str | None, mlflow_run: str | None
) -> tuple[MlflowTarget | None, str]:
    """The run's MLflow target, or None and the reason the MLflow check is skipped."""
    info = run.mlflow or {}
    uri = tracking_uri or _text(info.get("tracking_uri"))
    parent = mlflow_run or _text(info.get("parent_run_id"))
    if not run.mlflow and tracking_uri is None and mlflow_run is None:
        return None, f"run {run.name!r} has no mlflow.json and no tracking URI was given"
    if uri is None:
        return None, f"no tracking URI for run {run.name!r} (give --tracking-uri)"
    missing = mlflow_missing()
    if missing is not None:
        return None, missing
    if uri.startswith(_SQLITE):
        database = uri[len(_SQLITE) :].partition("?")[0]
        if database and database != ":memory:" and not Path(database).is_file():
            return None, f"the tracking store {database} does not exist"
    site_runs: dict[str, str] = {}
    recorded = info.get("site_runs")
    if isinstance(recorded, Mapping) and (mlflow_run is None or mlflow_run == parent):
        site_runs = {str(k): str(v) for k, v in recorded.items() if isinstance(v, str)}
    return MlflowTarget(tracking_uri=uri, parent_run_id=parent, site_runs=site_runs), ""


class MlflowStore:
    """A read-only view of one tracking store."""

    def __init__(self, *, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        with quiet_mlflow():
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    def site_runs(self, target: MlflowTarget) -> dict[str, str]:
        """Site id -> child run id: from ``mlflow.json``, else the parent run's children."""
        if target.site_runs or target.parent_run_id is None:
            return dict(target.site_runs)
        with quiet_mlflow():
            parent = self._client.get_run(target.parent_run_id)
            children = self._client.search_runs(
                experiment_ids=[parent.info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{target.parent_run_id}'",
            )
        found: dict[str, str] = {}
        for child in children:
            # medfed's tracker tags each child with its site and names it "<run>/<site>".
            name = str(child.info.run_name or "")
            site = child.data.tags.get("medfed.site_id") or name.rpartition("/")[2]
            if site:
                found[str(site)] = child.info.run_id
        return found

    def table_values(self, parent_run_id: str, key: str = METRIC) -> dict[str, tuple[int, float]]:
        """Site id -> (round, value) of ``key`` in the last round table that has the site.

        A simulation logs child runs for a few sites only and every site's metrics of a round
        as one table, ``site_metrics/round-NNNN.csv`` (:mod:`medfed.transport.simulation_tracking`),
        on the parent run; a deployment has no such tables (an empty answer).
        """
        import tempfile

        with quiet_mlflow():
            listed = self._client.list_artifacts(parent_run_id, SITE_TABLES)
        tables = sorted(
            (int(match.group(1)), item.path)
            for item in listed
            if (match := ROUND_TABLE.fullmatch(Path(item.path).name)) is not None
        )
        found: dict[str, tuple[int, float]] = {}
        with tempfile.TemporaryDirectory(prefix="medfed-audit-") as scratch:
            for round_, path in tables:
                with quiet_mlflow():
                    local = self._client.download_artifacts(parent_run_id, path, scratch)
                with open(local, encoding="utf-8", newline="") as handle:
                    for row in csv.DictReader(handle):
                        value = _number(row.get(key))
                        site = row.get(SITE_COLUMN)
                        if site and value is not None:
                            found[site] = (round_, value)
        return found

    def last_value(self, run_id: str, key: str = METRIC) -> tuple[int, float] | None:
        """(step, value) of the last logged value of ``key`` (highest step, then latest)."""
        with quiet_mlflow():
            history = self._client.get_metric_history(run_id, key)
        if not history:
            return None
        last = max(history, key=lambda m: (m.step, m.timestamp))
        return int(last.step), float(last.value)

    def model_versions(self, name: str) -> list[ModelVersion]:
        """Every version of the registered model ``name`` (none when it is not registered)."""
        with quiet_mlflow():
            versions = self._client.search_model_versions(f"name = '{name}'")
        found = [
            ModelVersion(
                name=name,
                version=str(v.version),
                source=str(v.source),
                run_id=v.run_id,
                sites=version_sites(v.tags),
                tags={str(k): str(t) for k, t in v.tags.items()},
            )
            for v in versions
        ]
        return sorted(found, key=lambda v: int(v.version) if v.version.isdigit() else 0)


def version_sites(tags: Mapping[str, str]) -> tuple[str, ...]:
    """The sites a model version names: its ``medfed.sites`` tag, or for a federation too
    large for that tag to list (it holds a count and a digest then) the sites of its
    ``medfed.epsilon.<site>`` tags, which every site of the version has."""
    listed = parse_sites(tags.get(SITES_TAG, ""))
    count = tags.get(SITE_COUNT_TAG)
    if count is None or not count.isdigit() or len(listed) == int(count):
        return listed
    return tuple(
        sorted(k[len(EPSILON_TAG_PREFIX) :] for k in tags if k.startswith(EPSILON_TAG_PREFIX))
    )


def parse_sites(value: str) -> tuple[str, ...]:
    """The sites of a ``medfed.sites`` tag: a JSON list or comma-separated ids."""
    text = value.strip()
    if text.startswith("["):
        with contextlib.suppress(ValueError):
            items = json.loads(text)
            if isinstance(items, list):
                return tuple(str(item) for item in items)
    return tuple(part.strip() for part in text.split(",") if part.strip())


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Short timeouts, no retries, and no store-initialisation chatter, for this block only."""
    saved_env = {name: os.environ.get(name) for name in _QUIET_ENV}
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for name, old in saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _number(text: str | None) -> float | None:
    try:
        return None if text is None or text == "" else float(text)
    except ValueError:
        return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
