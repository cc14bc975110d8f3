"""The aggregator's step from a distributed-noise sum: the gradient over the mean noisy count."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.aggregator.distributed_step import distributed_step
from medfed.config.run import RunSettings
from medfed.errors import SecureAggregationError
from medfed.secagg.discrete_noise import patient_vector
from medfed.secagg.grid import grid_for, to_words

REFERENCE = {"b": np.zeros(3, dtype=np.float32), "a": np.ones((2, 2), dtype=np.float32)}


def _settings(**changes: object) -> RunSettings:
    data: dict[str, object] = {
        "run_name": "ddg",
        "local_epochs": 1,
        "learning_rate": 0.5,
        "max_grad_norm": 1.0,
        "min_sites": 3,
        "secure_aggregation": True,
        "distributed_noise": {"sites": 3},
    }
    return RunSettings.model_validate({**data, **changes})


def _words(gradients: np.ndarray, *, count: int, round_id: int = 1) -> np.ndarray:
    """The sum of ``gradients`` (one row per patient) on the round's grid, with ``count``."""
    grid = grid_for(dim=7, clip=1.0, count_share=0.25, run_id="ddg", round_id=round_id)
    total = sum(
        patient_vector(row, seed=grid.rotation_seed, scale=grid.scale, l2_bound=grid.l2_bound)
        for row in gradients
    )
    return to_words(np.concatenate([total, [count * grid.count_weight]]))


def test_the_step_is_the_gradient_sum_over_the_running_mean_count() -> None:
    rng = np.random.default_rng(0)
    gradients = rng.normal(size=(6, 7))
    gradients /= np.linalg.norm(gradients, axis=1, keepdims=True) * 2  # norms 0.5: unclipped
    counts: list[float] = []
    first = distributed_step(
        settings=_settings(),
        round_index=1,
        words=_words(gradients, count=6),
        reference=REFERENCE,
        counts=counts,
    )
    assert counts == [6.0] and first.total_weight == 6 and first.loss is None
    # flattened in name order: a (4 values) then b (3)
    expected = -0.5 * gradients.sum(axis=0) / 6
    got = np.concatenate([first.weights["a"].ravel() - 1.0, first.weights["b"].ravel()])
    # each patient's rounding moves its vector by at most sqrt(padded) grid units (L2)
    grid = grid_for(dim=7, clip=1.0, count_share=0.25, run_id="ddg", round_id=1)
    bound = 0.5 / 6 * 6 * np.sqrt(grid.padded) / grid.scale
    assert np.linalg.norm(got - expected) <= bound
    # a second round's count of 12 (as noise could make it): the step divides by the mean, 9
    second = distributed_step(
        settings=_settings(),
        round_index=2,
        words=_words(gradients, count=12, round_id=2),
        reference=REFERENCE,
        counts=counts,
    )
    assert counts == [6.0, 12.0] and second.total_weight == 9


def test_a_count_below_the_shares_counted_on_is_floored() -> None:
    counts = [-40.0]
    step = distributed_step(
        settings=_settings(),
        round_index=1,
        words=_words(np.zeros((1, 7)), count=1),
        reference=REFERENCE,
        counts=counts,
    )
    assert step.total_weight == 3  # max(mean(-40, 1), 3 shares)


def test_a_run_without_distributed_noise_is_refused() -> None:
    with pytest.raises(SecureAggregationError, match="needs the run's distributed_noise"):
        distributed_step(
            settings=RunSettings(run_name="plain"),
            round_index=1,
            words=np.zeros(9, dtype=np.uint32),
            reference=REFERENCE,
            counts=[],
        )
