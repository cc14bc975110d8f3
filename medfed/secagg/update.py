"""How a site's round becomes one vector to mask, and how the aggregator reads the sum back.

Both sides compute the same layout from the run's settings alone: the weight change of every
array of the global model (sorted by name, flattened), clipped to +-``bound``, then two extra
values, the round's training loss and a flag that the site has one. The loss is carried as
``loss * bound / LOSS_RANGE`` (clipped to the loss range) so that it fits the same bound as the
update. The encoding is :func:`medfed.secagg.choose_scale` for the key epoch's number of sites,
the run's largest weight and ``bound``: its sum cannot wrap (see :mod:`medfed.secagg.encoding`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from medfed.secagg.encoding import FixedPoint, WeightedSum, choose_scale

LOSS_RANGE: Final = 16.0
"""Losses are carried clipped to [0, LOSS_RANGE]: a segmentation loss stays far below it."""
EXTRAS: Final = 2


def run_encoding(*, sites: int, max_weight: int, bound: float) -> FixedPoint:
    """The encoding of a key epoch of ``sites`` sites; the rounding error it allows on the sum
    of weighted updates is at most ``bound`` (one patient's largest change), and in practice
    ``sites / (2 scale)``, orders of magnitude less."""
    return choose_scale(sites=sites, max_weight=max_weight, max_abs=bound, max_error=bound)


def evaluation_round(planned_rounds: int) -> int:
    """The round id a run's secure evaluation is masked as: one past its training rounds, so
    that no mask is used twice."""
    return planned_rounds + 1


def flatten_change(
    *, weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float
) -> tuple[np.ndarray, int]:
    """``weights - reference`` as one float64 vector clipped to +-``bound``, and how many
    coordinates the clipping changed (post-processing of the DP weights: no privacy cost)."""
    parts = [
        np.subtract(np.asarray(weights[name]), reference[name], dtype=np.float64).reshape(-1)
        for name in sorted(reference)
    ]
    change = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    outside = int(np.count_nonzero(~(np.abs(change) <= bound)))
    np.nan_to_num(change, copy=False, nan=0.0)
    np.clip(change, -bound, bound, out=change)
    return change, outside


def add_change(*, reference: Mapping[str, np.ndarray], change: np.ndarray) -> dict[str, np.ndarray]:
    """``reference`` plus a flat ``change`` in :func:`flatten_change`'s layout (every array
    sorted by name), in float64 and then float32, in ``reference``'s order."""
    change = np.asarray(change, dtype=np.float64)
    weights: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(reference):
        array = reference[name]
        size = int(array.size)
        part = change[offset : offset + size].reshape(array.shape)
        weights[name] = (array.astype(np.float64) + part).astype(np.float32)
        offset += size
    return {name: weights[name] for name in reference}


def loss_extras(loss: float | None, *, bound: float) -> tuple[float, float]:
    """The extras of a site's round: its scaled, clipped loss and whether it has one."""
    if loss is None or not math.isfinite(loss):
        return 0.0, 0.0
    return min(max(loss, 0.0), LOSS_RANGE) * bound / LOSS_RANGE, bound


@dataclass(frozen=True, eq=False)
class MeanUpdate:
    """What the aggregator learns from a round's sum: the weighted means, the total weight."""

    weights: dict[str, np.ndarray]
    total_weight: int
    loss: float | None
    max_error: float  # the most a coordinate of ``weights`` may differ from the exact mean


def mean_update(
    *, total: WeightedSum, reference: Mapping[str, np.ndarray], bound: float
) -> MeanUpdate:
    """``reference`` plus the weighted mean change; the weighted mean loss of the sites that
    had one."""
    weights = add_change(reference=reference, change=total.mean())
    loss_sum, has = total.extras
    with_loss = has / bound
    loss = None if with_loss < 0.5 else loss_sum * LOSS_RANGE / bound / with_loss
    return MeanUpdate(
        weights=weights,
        total_weight=total.weight,
        loss=loss,
        max_error=total.max_error / total.weight,
    )
