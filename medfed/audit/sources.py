"""The workspace files an audit reads: ledger copies, and each run's records.

Only reading, never writing: an audit leaves the workspace exactly as it found it. Where each
file is comes from :class:`medfed.workspace.WorkspaceLayout`: the ledger copies, and per run its
``summary.json`` (the final table, per site epsilon spent), ``events.jsonl``
(:mod:`medfed.run_events`), ``settings.json`` and ``mlflow.json`` (where it was tracked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.errors import ConfigError
from medfed.run_events import RunEvent, SiteUpdated, of_kind, read_events
from medfed.workspace import RunPaths, WorkspaceLayout


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """What one run's directory holds (missing files are None or empty)."""

    name: str
    directory: Path
    summary: Mapping[str, Any] | None
    settings: Mapping[str, Any] | None
    events: tuple[RunEvent, ...]
    mlflow: Mapping[str, Any] | None

    def site_updates(self) -> list[SiteUpdated]:
        """The run's accepted site updates, in order."""
        return of_kind(self.events, SiteUpdated)

    def budget(self, site_id: str) -> Mapping[str, Any] | None:
        """``summary.budgets.sites.<site>`` (entries, epsilon_spent, delta, last_hash...)."""
        if self.summary is None:
            return None
        budgets = self.summary.get("budgets")
        sites = budgets.get("sites") if isinstance(budgets, Mapping) else None
        found = sites.get(site_id) if isinstance(sites, Mapping) else None
        return found if isinstance(found, Mapping) else None

    def summary_row(self, site_id: str) -> Mapping[str, Any] | None:
        """The site's row of ``summary.sites``."""
        rows = [] if self.summary is None else self.summary.get("sites", [])
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, Mapping) and row.get("site_id") == site_id:
                return row
        return None

    def site_ids(self) -> list[str]:
        """Sites the run's summary names."""
        rows = [] if self.summary is None else self.summary.get("sites", [])
        return [
            str(row["site_id"])
            for row in (rows if isinstance(rows, list) else [])
            if isinstance(row, Mapping) and isinstance(row.get("site_id"), str)
        ]


def read_runs(*, workspace_root: Path, run_name: str | None) -> list[RunRecord]:
    """The named run, or every run of the workspace (sorted by name)."""
    layout = WorkspaceLayout(root=Path(workspace_root))
    if run_name is None:
        return [_read_run(layout.run(name)) for name in layout.run_names()]
    if Path(run_name).name != run_name or not layout.run(run_name).directory.is_dir():
        known = ", ".join(layout.run_names()) or "none"
        raise ConfigError(
            f"no run {run_name!r} in {layout.runs}", hint=f"runs of this workspace: {known}"
        )
    return [_read_run(layout.run(run_name))]


def _read_run(paths: RunPaths) -> RunRecord:
    events, _ = read_events(paths.events)
    return RunRecord(
        name=paths.directory.name,
        directory=paths.directory,
        summary=_json_object(paths.summary),
        settings=_json_object(paths.settings),
        events=tuple(events),
        mlflow=_json_object(paths.mlflow_info),
    )


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable ({exc})", hint="restore the run directory from backup"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a JSON object", hint="restore it from backup")
    return obj
