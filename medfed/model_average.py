"""An exponential moving average of a run's global models, released as its final model.

The aggregator builds it (``ema: {decay}`` in the run settings) and ``medfed audit trace``
rebuilds it from the stored round models to check a registered average, so it lives apart from
both, with numpy and :mod:`medfed.model_files` only.

Averaging the iterates of noisy training smooths the noise of the last rounds out of the
released model (Polyak averaging; De et al. 2022 use it for DP-SGD). Every global model it
averages was already released, so the average is post-processing: it costs no privacy and
needs no ledger entry.

``ema_1 = w_1`` and ``ema_t = decay * ema_(t-1) + (1 - decay) * w_t`` over the rounds' global
models ``w_t`` (the untrained initial model is left out), in float64, released in float32.
Arrays that are not floating point (counters) are the last model's. The average is rebuilt on
``--resume`` from the global models the run store kept for every round, so it needs no state
of its own. It is written to the run's ``ema-model/`` directory with metadata naming the
rounds, the digest of each model it averages and the hash of the last round's record (the head
of the run's chain of round records, which the trace walks back from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from medfed.errors import ModelError
from medfed.model_files import read_model, write_model
from medfed.types import weights_digest
from medfed.workspace import RunPaths

__all__ = ["EMA_MODEL_DIR", "ModelAverage", "ema_model_path", "stored_average"]

EMA_MODEL_DIR: Final = "ema-model"


def ema_model_path(paths: RunPaths) -> Path:
    """Where a run writes its averaged model: ``runs/<run>/ema-model/``."""
    return paths.directory / EMA_MODEL_DIR


class ModelAverage:
    """The running average of the global models given to :meth:`add`, one per round."""

    def __init__(self, *, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.rounds: list[int] = []
        self.digests: list[str] = []
        self._average: dict[str, np.ndarray] = {}
        self._last: Mapping[str, np.ndarray] = {}

    def add(self, *, round: int, weights: Mapping[str, np.ndarray]) -> None:
        """Fold the global model of ``round`` into the average."""
        first = not self.rounds
        for name, array in weights.items():
            if not np.issubdtype(array.dtype, np.floating):
                continue
            if first:
                self._average[name] = np.array(array, dtype=np.float64)
            else:
                average = self._average[name]
                average *= self.decay
                average += (1.0 - self.decay) * np.asarray(array, dtype=np.float64)
        self._last = weights
        self.rounds.append(round)
        self.digests.append(weights_digest(weights))

    def weights(self) -> dict[str, np.ndarray]:
        """The average, shaped and ordered like the last model added (float32 where floating).

        Raises:
            ValueError: no model was added.
        """
        if not self.rounds:
            raise ValueError("no global model has been averaged yet")
        return {
            name: self._average[name].astype(array.dtype) if name in self._average else array
            for name, array in self._last.items()
        }

    @classmethod
    def rebuilt(cls, *, decay: float, paths: RunPaths, rounds: Sequence[int]) -> ModelAverage:
        """The average of a run's global models of ``rounds``, in order, as the run kept them."""
        average = cls(decay=decay)
        for index in rounds:
            average.add(round=index, weights=read_model(paths.global_model(index)).weights)
        return average

    @classmethod
    def resumed(cls, *, decay: float, paths: RunPaths, last_round: int) -> ModelAverage:
        """The average a run resumed after ``last_round`` had: of every round that left a
        global model (a securely aggregated round that was abandoned left none)."""
        rounds = [r for r in range(1, last_round + 1) if paths.global_model(r).is_dir()]
        return cls.rebuilt(decay=decay, paths=paths, rounds=rounds)

    def metadata(self, *, run_name: str, trace_head: str) -> dict[str, Any]:
        """What the averaged model's manifest says it is made of.

        ``trace_head``: the SHA-256 of the last averaged round's record.
        """
        return {
            "run_name": run_name,
            "ema": {
                "decay": self.decay,
                "rounds": list(self.rounds),
                "global_sha256": list(self.digests),
                "trace_head": trace_head,
            },
        }

    def write(
        self, *, paths: RunPaths, run_name: str, spec: Mapping[str, Any], trace_head: str
    ) -> Path:
        """Write the averaged model beside the run's global models; its directory."""
        return write_model(
            ema_model_path(paths),
            weights=self.weights(),
            spec=spec,
            metadata=self.metadata(run_name=run_name, trace_head=trace_head),
        )


def stored_average(paths: RunPaths) -> tuple[ModelAverage, str] | None:
    """The run's stored average rebuilt from the round models its manifest names, and the
    stored one's digest; None when the run wrote no average or it cannot be rebuilt."""
    try:
        stored = read_model(ema_model_path(paths))
    except (ModelError, OSError):
        return None
    ema = stored.metadata.get("ema")
    if not isinstance(ema, Mapping):
        return None
    rounds = ema.get("rounds")
    decay = ema.get("decay")
    if not isinstance(rounds, list) or not rounds or not all(isinstance(r, int) for r in rounds):
        return None
    if not isinstance(decay, float) or not 0.0 < decay < 1.0:
        return None
    try:
        average = ModelAverage.rebuilt(decay=decay, paths=paths, rounds=rounds)
    except (ModelError, OSError, KeyError):
        return None  # a round model is missing or does not fit the others
    return average, weights_digest(stored.weights)
