"""The workspace files an audit reads: ledger copies, and each run's records.

Only reading, never writing: an audit leaves the workspace exactly as it found it. Layout::

    <workspace>/ledgers/<site>.ledger.jsonl   the aggregator's verified copy of a site's ledger
    <workspace>/runs/<run>/summary.json       the run's final table (per site epsilon_spent)
    <workspace>/runs/<run>/events.jsonl       one event per line (site_update: dice, epsilon)
    <workspace>/runs/<run>/settings.json      the run's settings
    <workspace>/runs/<run>/mlflow.json        where the run was tracked in MLflow (optional)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.errors import ConfigError

LEDGERS_DIR: Final = "ledgers"
RUNS_DIR: Final = "runs"
LEDGER_SUFFIX: Final = ".ledger.jsonl"
MLFLOW_FILE: Final = "mlflow.json"


def ledger_copy_path(*, workspace_root: Path, site_id: str) -> Path:
    return Path(workspace_root) / LEDGERS_DIR / f"{site_id}{LEDGER_SUFFIX}"


def copy_site_ids(workspace_root: Path) -> list[str]:
    """Site ids of every ledger copy on disk (registered or not)."""
    directory = Path(workspace_root) / LEDGERS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(LEDGER_SUFFIX)] for p in directory.glob(f"*{LEDGER_SUFFIX}"))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """What one run's directory holds (missing files are None or empty)."""

    name: str
    directory: Path
    summary: Mapping[str, Any] | None
    settings: Mapping[str, Any] | None
    events: tuple[Mapping[str, Any], ...]
    mlflow: Mapping[str, Any] | None

    def site_updates(self) -> list[Mapping[str, Any]]:
        """The run's ``site_update`` events in order."""
        return [event for event in self.events if event.get("event") == "site_update"]

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
    runs_dir = Path(workspace_root) / RUNS_DIR
    if run_name is not None:
        directory = runs_dir / run_name
        if not directory.is_dir() or Path(run_name).name != run_name:
            known = ", ".join(sorted(p.name for p in _run_dirs(runs_dir))) or "none"
            raise ConfigError(
                f"no run {run_name!r} in {runs_dir}", hint=f"runs of this workspace: {known}"
            )
        return [_read_run(directory)]
    return [_read_run(directory) for directory in sorted(_run_dirs(runs_dir))]


def _run_dirs(runs_dir: Path) -> list[Path]:
    return [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else []


def _read_run(directory: Path) -> RunRecord:
    return RunRecord(
        name=directory.name,
        directory=directory,
        summary=_json_object(directory / "summary.json"),
        settings=_json_object(directory / "settings.json"),
        events=tuple(_events(directory / "events.jsonl")),
        mlflow=_json_object(directory / MLFLOW_FILE),
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


def _events(path: Path) -> list[dict[str, Any]]:
    """Complete event lines (a torn last line, from a run still writing, is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for raw in data[: data.rfind(b"\n") + 1].splitlines():
        if raw.strip():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events
