"""Aggregation strategies: pure functions from site updates to new global weights.

No torch, no Flower, no I/O: arrays in, arrays out. Arithmetic is done in float64 and the
resulting weights are float32, the dtype models travel in. Every function refuses an empty update
list and updates whose names or shapes disagree (see
:func:`medfed.aggregator.validation.check_aggregatable`); judging content (NaNs, stale rounds) is
:func:`medfed.aggregator.validation.partition_updates`' job and must happen first.

FedProx needs nothing special here: its proximal term ``mu/2 * ||w - w_global||^2`` is added to
the *site's* local loss, and the server then averages exactly as FedAvg does (Li et al. 2020).
:class:`medfed.config.strategy.StrategySettings` carries ``proximal_mu`` so that it can be sent
to sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np

from medfed.aggregator.validation import check_aggregatable
from medfed.config.strategy import StrategySettings
from medfed.errors import AggregationError, ConfigError
from medfed.types import SiteUpdate, freeze_arrays

__all__ = [
    "AggregationResult",
    "FedAdam",
    "FedAdamState",
    "aggregate",
    "coordinate_median",
    "fedavg",
    "fedprox",
    "trimmed_count",
    "trimmed_mean",
]

Weights = dict[str, np.ndarray]


def _stack(updates: Sequence[SiteUpdate], name: str) -> np.ndarray:
    """The named array of every update, stacked on a new first axis, in float64."""
    return np.stack([update.weights[name].astype(np.float64) for update in updates])


def fedavg(*, updates: Sequence[SiteUpdate]) -> Weights:
    """Average the updates' weights, each site weighted by its number of training patients."""
    layout = check_aggregatable(updates=updates)
    for update in updates:
        if update.num_patients < 1:
            raise AggregationError(
                f"site {update.site_id!r} reports {update.num_patients} patients; "
                "FedAvg needs at least 1",
                hint="validate updates with partition_updates before aggregating",
            )
    total = float(sum(update.num_patients for update in updates))
    result: Weights = {}
    for name, shape in layout.items():
        acc = np.zeros(shape, dtype=np.float64)
        for update in updates:
            acc += update.num_patients * update.weights[name].astype(np.float64)
        result[name] = (acc / total).astype(np.float32)
    return result


def fedprox(*, updates: Sequence[SiteUpdate]) -> Weights:
    """FedProx's server step, which is FedAvg; the proximal term is applied at the sites."""
    return fedavg(updates=updates)


def coordinate_median(*, updates: Sequence[SiteUpdate]) -> Weights:
    """Coordinate-wise median of the updates, unweighted (Yin et al. 2018).

    Unweighted on purpose: weighting by a self-reported patient count would let one site buy
    the median by claiming many patients.
    """
    layout = check_aggregatable(updates=updates)
    return {name: np.median(_stack(updates, name), axis=0).astype(np.float32) for name in layout}


def trimmed_count(*, trim_fraction: float, num_updates: int) -> int:
    """How many values :func:`trimmed_mean` drops at *each* end: floor(trim_fraction * n).

    Raises:
        ConfigError: ``trim_fraction`` is outside [0, 0.5) or would leave no value to average.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ConfigError(
            f"trim_fraction must be in [0, 0.5), got {trim_fraction}",
            hint="e.g. 0.1 drops the top and bottom 10% of values per coordinate",
        )
    # The small slack keeps products like 0.29 * 100 = 28.999... from rounding down a whole step.
    k = math.floor(trim_fraction * num_updates + 1e-9)
    if num_updates - 2 * k < 1:
        raise ConfigError(
            f"trim_fraction {trim_fraction} drops {k} values at each end of {num_updates} "
            "updates, leaving none to average",
            hint="lower trim_fraction or wait for more sites",
        )
    return k


def trimmed_mean(*, updates: Sequence[SiteUpdate], trim_fraction: float) -> Weights:
    """Coordinate-wise trimmed mean: drop the k largest and k smallest values, average the rest.

    ``k = floor(trim_fraction * n)`` for ``n`` updates (Yin et al. 2018); unweighted, as for the
    median.
    """
    layout = check_aggregatable(updates=updates)
    k = trimmed_count(trim_fraction=trim_fraction, num_updates=len(updates))
    n = len(updates)
    result: Weights = {}
    for name in layout:
        ordered = np.sort(_stack(updates, name), axis=0)
        result[name] = ordered[k : n - k].mean(axis=0).astype(np.float32)
    return result


@dataclass(frozen=True, eq=False)
class FedAdamState:
    """FedAdam's server state: round counter and first/second moments (float64, read-only)."""

    step: int
    m: Mapping[str, np.ndarray]
    v: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        object.__setattr__(self, "m", freeze_arrays(self.m))
        object.__setattr__(self, "v", freeze_arrays(self.v))

    @classmethod
    def initial(cls, *, global_weights: Mapping[str, np.ndarray]) -> Self:
        """Zero moments shaped like ``global_weights``."""
        zeros = {name: np.zeros(a.shape, dtype=np.float64) for name, a in global_weights.items()}
        return cls(step=0, m=zeros, v=zeros)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array form for checkpoints (safetensors), never pickle."""
        arrays = {"step": np.array([self.step], dtype=np.int64)}
        arrays.update({f"m/{name}": np.array(a) for name, a in self.m.items()})
        arrays.update({f"v/{name}": np.array(a) for name, a in self.v.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Self:
        """Inverse of :meth:`to_arrays`.

        Raises:
            AggregationError: The arrays are not a FedAdam state (missing step, unmatched moments).
        """
        step = arrays.get("step")
        if step is None or step.shape != (1,) or step.dtype.kind not in "iu":
            raise AggregationError("FedAdam state has no integer 'step' array of shape (1,)")
        m = {key[2:]: a.astype(np.float64) for key, a in arrays.items() if key.startswith("m/")}
        v = {key[2:]: a.astype(np.float64) for key, a in arrays.items() if key.startswith("v/")}
        unknown = sorted(set(arrays) - {"step"} - {f"m/{k}" for k in m} - {f"v/{k}" for k in v})
        if unknown or m.keys() != v.keys() or any(m[k].shape != v[k].shape for k in m):
            raise AggregationError(
                "FedAdam state arrays do not pair up (every m/NAME needs a v/NAME of the same "
                f"shape; unknown keys: {unknown[:5]})"
            )
        return cls(step=int(step[0]), m=m, v=v)


@dataclass(frozen=True)
class FedAdam:
    """FedAdam server optimiser (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

    With ``x`` the global weights and ``avg`` the FedAvg of the updates, the pseudo-gradient is
    ``g = x - avg`` and one step is::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        x = x - eta * m / (sqrt(v) + tau)

    As in the paper there is no bias correction; ``tau`` bounds the step where ``v`` is tiny.
    """

    eta: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @classmethod
    def from_settings(cls, settings: StrategySettings) -> FedAdam:
        """The FedAdam optimiser a run's strategy settings describe."""
        return cls(
            eta=settings.server_lr, beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau
        )

    def __post_init__(self) -> None:
        if not (self.eta > 0 and self.tau > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(
                f"invalid FedAdam settings eta={self.eta} tau={self.tau} "
                f"beta1={self.beta1} beta2={self.beta2}",
                hint="eta and tau must be positive, beta1 and beta2 in [0, 1)",
            )

    def step(
        self,
        *,
        state: FedAdamState | None,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[SiteUpdate],
    ) -> tuple[Weights, FedAdamState]:
        """One server step; returns the new float32 weights and the new state (``state`` is
        left untouched). ``state=None`` starts from zero moments."""
        check_aggregatable(updates=updates, reference=global_weights)
        if state is None:
            state = FedAdamState.initial(global_weights=global_weights)
        moment_shapes = {name: a.shape for name, a in state.m.items()}
        if moment_shapes != {name: a.shape for name, a in global_weights.items()}:
            raise AggregationError(
                "FedAdam state does not match the global model's arrays",
                hint="restart the optimiser state when the model architecture changes",
            )
        average = fedavg(updates=updates)
        new_weights: Weights = {}
        m: Weights = {}
        v: Weights = {}
        for name, current in global_weights.items():
            x = current.astype(np.float64)
            g = x - average[name].astype(np.float64)
            m[name] = self.beta1 * state.m[name] + (1.0 - self.beta1) * g
            v[name] = self.beta2 * state.v[name] + (1.0 - self.beta2) * g * g
            new_weights[name] = (x - self.eta * m[name] / (np.sqrt(v[name]) + self.tau)).astype(
                np.float32
            )
        return new_weights, FedAdamState(step=state.step + 1, m=m, v=v)


@dataclass(frozen=True, eq=False)
class AggregationResult:
    """New global weights (float32) and the strategy state to pass to the next round."""

    weights: Mapping[str, np.ndarray]
    state: FedAdamState | None


def aggregate(
    *,
    settings: StrategySettings,
    state: FedAdamState | None,
    global_weights: Mapping[str, np.ndarray],
    updates: Sequence[SiteUpdate],
) -> AggregationResult:
    """Run the strategy ``settings.name`` names on one round's (already validated) updates.

    ``state`` is FedAdam's state from the previous round (``None`` at the start, and for the
    stateless strategies, which pass it through unchanged).

    Raises:
        AggregationError: ``updates`` is empty.
        AggregationError: An update's names or shapes differ from ``global_weights``.
        ConfigError: ``trim_fraction`` leaves nothing to average for this many updates.
    """
    check_aggregatable(updates=updates, reference=global_weights)
    match settings.name:
        case "fedavg":
            return AggregationResult(weights=fedavg(updates=updates), state=state)
        case "fedprox":
            return AggregationResult(weights=fedprox(updates=updates), state=state)
        case "median":
            return AggregationResult(weights=coordinate_median(updates=updates), state=state)
        case "trimmed_mean":
            weights = trimmed_mean(updates=updates, trim_fraction=settings.trim_fraction)
            return AggregationResult(weights=weights, state=state)
        case "fedadam":
            weights, new_state = FedAdam.from_settings(settings).step(
                state=state, global_weights=global_weights, updates=updates
            )
            return AggregationResult(weights=weights, state=new_state)
