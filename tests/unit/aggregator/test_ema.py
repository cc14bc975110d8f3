"""The moving average of the global models: its arithmetic, its rebuild on resume, its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.aggregator.run_store import RunStore
from medfed.config.run import RunSettings
from medfed.model_average import ModelAverage, ema_model_path, stored_average
from medfed.model_files import read_model
from medfed.types import weights_digest
from medfed.workspace import run_paths


def _models(rounds: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "count": np.array(index, dtype=np.int64),
        }
        for index in range(1, rounds + 1)
    ]


def test_the_average_follows_its_definition() -> None:
    models = _models(4)
    average = ModelAverage(decay=0.9)
    for index, model in enumerate(models, start=1):
        average.add(round=index, weights=model)
    expected = models[0]["w"].astype(np.float64)
    for model in models[1:]:
        expected = 0.9 * expected + 0.1 * model["w"].astype(np.float64)
    result = average.weights()
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], expected.astype(np.float32), rtol=1e-6)
    assert int(result["count"]) == 4  # counters: the last model's
    with pytest.raises(ValueError):
        ModelAverage(decay=1.0)
    with pytest.raises(ValueError, match="no global model"):
        ModelAverage(decay=0.5).weights()


def test_a_resumed_run_rebuilds_the_average_from_its_stored_rounds(tmp_path: Path) -> None:
    paths = run_paths(tmp_path, "study")
    store = RunStore(paths=paths)
    store.start(RunSettings(run_name="study"))
    models = _models(3)
    running = ModelAverage(decay=0.8)
    for index, model in enumerate(models, start=1):
        store.save_round(round=index, weights=model, spec={}, strategy_state=None, metadata={})
        running.add(round=index, weights=model)
    rebuilt = ModelAverage.resumed(decay=0.8, paths=paths, last_round=3)
    np.testing.assert_array_equal(rebuilt.weights()["w"], running.weights()["w"])
    directory = rebuilt.write(
        paths=paths, run_name="study", spec={"network": "unet"}, trace_head="ab" * 32
    )
    assert directory == ema_model_path(paths)
    stored = read_model(directory)
    assert weights_digest(stored.weights) == weights_digest(running.weights())
    assert stored.metadata["ema"] == {
        "decay": 0.8,
        "rounds": [1, 2, 3],
        "global_sha256": [weights_digest(m) for m in models],
        "trace_head": "ab" * 32,
    }
    assert stored.metadata["run_name"] == "study"
    found = stored_average(paths)
    assert found is not None
    again, digest = found
    assert digest == weights_digest(again.weights()) == weights_digest(running.weights())
    assert stored_average(run_paths(tmp_path, "other")) is None
