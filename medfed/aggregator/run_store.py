"""A federation run's directory on the aggregator: events, global models, resume state.

Layout under ``<workspace>/runs/<run_name>/``::

    settings.json          the run's settings as first submitted
    events.jsonl           one JSON object per event (what `medfed run` streams)
    global/round-NNNN/     the global model after each round (safetensors + model.json)
    state.json             the last completed round and where its model is (written last)
    strategy.safetensors   FedAdam's moments, when the strategy has state
    summary.json           the final table, when the run has ended

``state.json`` is replaced atomically after the round's model is on disk, so a crash at any
point resumes from a round whose model exists.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config.run import RunSettings
from medfed.errors import ConfigError
from medfed.privacy.storage import make_private_dirs, replace_file

EVENTS_FILE = "events.jsonl"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``round``, from that round's global model."""

    round: int
    weights: Mapping[str, np.ndarray]
    spec: Mapping[str, Any]
    strategy_state: Mapping[str, np.ndarray] | None


def run_directory(workspace: Path, run_name: str) -> Path:
    return Path(workspace) / "runs" / run_name


class RunStore:
    """Reads and writes one run's directory; every write is atomic."""

    def __init__(self, *, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def events_path(self) -> Path:
        return self.directory / EVENTS_FILE

    def start(self, settings: RunSettings) -> ResumePoint | None:
        """Prepare the directory; return where to resume, or None for a fresh run.

        A fresh run refuses a name that already has completed rounds, so that nobody resumes
        or overwrites a run by accident.
        """
        state = self.check_name(settings)
        make_private_dirs(self.directory)
        if state is None:
            replace_file(self.directory / "settings.json", _json(settings.model_dump(mode="json")))
            return None
        return self._resume_point(state)

    def check_name(self, settings: RunSettings) -> dict[str, Any] | None:
        """The stored state; refuses a fresh run under a name that has completed rounds."""
        state = self._read_state()
        if state is not None and not settings.resume:
            raise ConfigError(
                f"run {settings.run_name!r} already exists in {self.directory} "
                f"(round {state['round']} done)",
                hint="resume it (`medfed run --resume`, resume=true), or choose another run name",
            )
        return state

    def save_round(
        self,
        *,
        round: int,
        weights: Mapping[str, np.ndarray],
        spec: Mapping[str, Any],
        strategy_state: Mapping[str, np.ndarray] | None,
        metadata: Mapping[str, Any],
    ) -> Path:
        """Save the global model of ``round`` and then mark the round complete."""
        from medfed.models.checkpoint import save_weights
        from medfed.models.spec import ModelSpec

        model_dir = self.directory / "global" / f"round-{round:04d}"
        save_weights(
            directory=model_dir,
            weights=weights,
            spec=ModelSpec.from_dict(dict(spec), source="the run's model spec"),
            metadata=dict(metadata),
        )
        if strategy_state is not None:
            from safetensors.numpy import save_file

            temporary = self.directory / ".strategy.safetensors.tmp"
            save_file(
                {k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, str(temporary)
            )
            os.replace(temporary, self.directory / "strategy.safetensors")
        state = {"round": round, "model": str(model_dir.relative_to(self.directory))}
        replace_file(self.directory / STATE_FILE, _json(state))
        return model_dir

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one event line (flushed at once, so a follower sees it)."""
        record = {"time": time.time(), "event": kind, **fields}
        make_private_dirs(self.directory)  # events may come before start() (tests, tools)
        with self.events_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_jsonable) + "\n")
        return record

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.directory / SUMMARY_FILE
        replace_file(path, _json(summary))
        return path

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.directory / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.directory / STATE_FILE}: unreadable ({exc})",
                hint="restore the run directory from backup, or start a new run name",
            ) from None
        if not isinstance(state, dict) or not isinstance(state.get("round"), int):
            raise ConfigError(f"{self.directory / STATE_FILE}: not a run state")
        return state

    def _resume_point(self, state: Mapping[str, Any]) -> ResumePoint:
        from medfed.models.checkpoint import read_weights

        stored = read_weights(path=self.directory / str(state["model"]))
        strategy_state = None
        strategy_file = self.directory / "strategy.safetensors"
        if strategy_file.exists():
            from safetensors.numpy import load_file

            strategy_state = load_file(str(strategy_file))
        return ResumePoint(
            round=int(state["round"]),
            weights=stored.weights,
            spec=stored.spec.to_dict(),
            strategy_state=strategy_state,
        )


def read_events(path: Path, *, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete event lines from byte ``offset`` on, and the offset after the last one."""
    try:
        with Path(path).open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
