"""A federation run's directory on the aggregator: settings, global models, resume state.

Where each file is, :class:`medfed.workspace.RunPaths` says: the settings as first submitted,
the global model after each round (:mod:`medfed.model_files`, no torch), FedAdam's moments, the
resume state and the summary (the events are :mod:`medfed.run_events`'). The state is replaced
atomically after the round's model is on disk, so a crash at any point resumes from a round
whose model exists.

Each global model's metadata is its round record (:func:`round_record`): the digests of the
model the round started from and of the one it made, and per site the update it received and
the ledger entries that paid for it, chained by hash to the record of the round before, so
that ``medfed audit trace`` can walk from a model back to every ledger entry behind it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config.run import RunSettings
from medfed.errors import ConfigError
from medfed.model_files import read_arrays, read_model, write_arrays, write_model
from medfed.privacy.events import GENESIS_HASH, canonical_json
from medfed.storage import make_private_dirs, replace_file
from medfed.workspace import RunPaths


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``round``, from that round's global model.

    ``record`` is that model's round record, which the next round's record chains to.
    """

    round: int
    weights: Mapping[str, np.ndarray]
    spec: Mapping[str, Any]
    strategy_state: Mapping[str, np.ndarray] | None
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedUpdate:
    """What the aggregator accepted from one site in one round, as its round record lists it.

    ``ledger_first_seq``/``ledger_last_seq`` span the ledger lines the reply carried (None
    for the last when it carried none); ``commit_seq`` is the round's commit entry.
    """

    update_sha256: str
    ledger_first_seq: int
    ledger_last_seq: int | None
    commit_seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "update_sha256": self.update_sha256,
            "ledger_first_seq": self.ledger_first_seq,
            "ledger_last_seq": self.ledger_last_seq,
            "commit_seq": self.commit_seq,
        }


def round_record(
    *,
    run_name: str,
    round: int,
    previous: Mapping[str, Any] | None,
    start_sha256: str | None,
    global_sha256: str,
    updates: Mapping[str, ReceivedUpdate],
    distributed_counts: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The record stored beside a round's global model, chained to the round before.

    ``previous`` is the previous round's record (None for round 0, the initial model, which
    starts the chain); the chain's head is :func:`record_sha256` of the final record.
    ``distributed_counts``: with distributed noise, the run's noisy patient counts so far
    (sums over the sites, which the steps divide by the mean of), so that a resumed run
    continues that mean.
    """
    record = {
        "round": round,
        "run_name": run_name,
        "previous_record_sha256": GENESIS_HASH if previous is None else record_sha256(previous),
        "start_sha256": start_sha256,
        "global_sha256": global_sha256,
        "sites": sorted(updates),
        "updates": {site: updates[site].to_json() for site in sorted(updates)},
    }
    if distributed_counts is not None:
        record["distributed_counts"] = [float(count) for count in distributed_counts]
    return record


def record_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 of a round record's canonical JSON: what the next record and MLflow name it by."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


class RunStore:
    """Reads and writes one run's directory; every write is atomic."""

    def __init__(self, *, paths: RunPaths) -> None:
        self.paths = paths

    @property
    def directory(self) -> Path:
        return self.paths.directory

    def start(self, settings: RunSettings) -> ResumePoint | None:
        """Prepare the directory; return where to resume, or None for a fresh run.

        A fresh run refuses a name that already has completed rounds, so that nobody resumes
        or overwrites a run by accident.
        """
        state = self.check_name(settings)
        make_private_dirs(self.directory)
        if state is None:
            replace_file(self.paths.settings, _json(settings.model_dump(mode="json")))
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
        model_dir = self.paths.global_model(round)
        write_model(model_dir, weights=weights, spec=spec, metadata=metadata)
        if strategy_state is not None:
            write_arrays(self.paths.strategy_state, strategy_state)
        state = {"round": round, "model": str(model_dir.relative_to(self.directory))}
        replace_file(self.paths.state, _json(state))
        return model_dir

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        replace_file(self.paths.summary, _json(summary))
        return self.paths.summary

    def _read_state(self) -> dict[str, Any] | None:
        path = self.paths.state
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path}: unreadable ({exc})",
                hint="restore the run directory from backup, or start a new run name",
            ) from None
        if not isinstance(state, dict) or not isinstance(state.get("round"), int):
            raise ConfigError(f"{path}: not a run state")
        return state

    def _resume_point(self, state: Mapping[str, Any]) -> ResumePoint:
        stored = read_model(self.directory / str(state["model"]))
        strategy_file = self.paths.strategy_state
        return ResumePoint(
            round=int(state["round"]),
            weights=stored.weights,
            spec=stored.spec,
            strategy_state=read_arrays(strategy_file) if strategy_file.exists() else None,
            record=stored.metadata,
        )


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n").encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
