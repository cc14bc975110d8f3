"""The aggregator's side of a distributed-noise round: one DP-SGD step over every site's patients.

The unmasked sum (:mod:`medfed.secagg.grid`) holds the sites' noisy sum of clipped
per-patient gradients and their noisy patient count, each with the sum of the sites' noise
shares. The step is the one full-batch DP-SGD takes: ``-learning_rate * gradient / count``,
from the global model; the round's strategy (FedAvg, FedProx, FedAdam) then treats the result as
the round's one mean update, as it does any secure round's. Everything here is post-processing
of the noisy sum: it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from medfed.config.run import RunSettings
from medfed.errors import SecureAggregationError
from medfed.secagg.grid import decode, grid_for
from medfed.secagg.update import MeanUpdate, add_change


def distributed_step(
    *,
    settings: RunSettings,
    round_index: int,
    words: np.ndarray,
    reference: Mapping[str, np.ndarray],
    counts: list[float],
) -> MeanUpdate:
    """The global model after the round's noisy step, and the patient count it divided by.

    Each round's noisy count is appended to ``counts`` (the run's, kept by the caller), and the
    step divides by their mean: the sites' patients do not change from round to round, so the
    mean's noise shrinks as the rounds go by (its standard deviation, ``1 / count_share`` times
    the gradient's noise multiplier in patients for one round, falls with the square root of
    the rounds), where one round's noisy count alone would scale each step at random. The
    denominator is floored at one patient per share counted on, so that noise never turns the
    step into a division by a count near zero (or below it).

    Raises:
        SecureAggregationError: The run is not a distributed-noise run with its clip and
            learning rate set, or the sum does not fit the round's grid.
    """
    noise = settings.distributed_noise
    if noise is None or settings.max_grad_norm is None or settings.learning_rate is None:
        raise SecureAggregationError(
            "a distributed-noise step needs the run's distributed_noise, max_grad_norm and "
            "learning_rate"
        )
    grid = grid_for(
        dim=sum(int(array.size) for array in reference.values()),
        clip=settings.max_grad_norm,
        count_share=noise.count_share,
        run_id=settings.run_name,
        round_id=round_index,
    )
    noisy = decode(grid=grid, words=words)
    counts.append(noisy.patients)
    patients = max(float(np.mean(counts)), float(noise.sites))
    step = noisy.gradient * (-settings.learning_rate / patients)
    # Rounding to the grid moves each patient's coordinate by at most half a grid unit.
    return MeanUpdate(
        weights=add_change(reference=reference, change=step),
        total_weight=max(1, round(patients)),
        loss=None,
        max_error=settings.learning_rate * 0.5 / grid.scale,
    )
