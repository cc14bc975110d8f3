"""A run's ``mlflow.json`` (:attr:`medfed.workspace.RunPaths.mlflow_info`): where the run is in
MLflow, read without MLflow.

Written by the tracker as soon as the runs exist::

    {"tracking_uri": ..., "experiment_id": ..., "parent_run_id": ...,
     "site_runs": {"site-a": run_id, ...}, "run_name": ..., "keys": {...}}

``keys`` are the tracker's own names for the runs (they tie queued operations to runs across a
restart); the other fields are what people and the auditor's tools read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfed.storage import make_private_dirs, replace_file
from medfed.workspace import RunPaths


@dataclass(frozen=True)
class TrackingInfo:
    """A run's place in MLflow."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    site_runs: Mapping[str, str] = field(default_factory=dict)
    run_name: str = ""
    parent_key: str = ""
    site_keys: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "site_runs": dict(sorted(self.site_runs.items())),
            "run_name": self.run_name,
            "keys": {"parent": self.parent_key, "sites": dict(sorted(self.site_keys.items()))},
        }


def read_tracking_info(*, paths: RunPaths) -> TrackingInfo | None:
    """The run's ``mlflow.json``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads(paths.mlflow_info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("parent_run_id"), str):
        return None
    keys: dict[str, Any] = data["keys"] if isinstance(data.get("keys"), dict) else {}
    return TrackingInfo(
        tracking_uri=str(data.get("tracking_uri", "")),
        experiment_id=str(data.get("experiment_id", "")),
        parent_run_id=data["parent_run_id"],
        site_runs={str(k): str(v) for k, v in dict(data.get("site_runs") or {}).items()},
        run_name=str(data.get("run_name", "")),
        parent_key=str(keys.get("parent", "")),
        site_keys={str(k): str(v) for k, v in dict(keys.get("sites") or {}).items()},
    )


def write_tracking_info(*, paths: RunPaths, info: TrackingInfo) -> None:
    make_private_dirs(paths.directory)
    text = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
    replace_file(paths.mlflow_info, text.encode("utf-8"))


def describe(info: TrackingInfo) -> str:
    """One line for the CLI: the run id and where to look."""
    where = f"experiment {info.experiment_id} at {info.tracking_uri}"
    return f"MLflow run {info.parent_run_id} ({where})"
