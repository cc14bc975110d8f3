"""Site-level (central) DP at the aggregator: DP-FedAvg as a wrapper around a round's aggregation.

McMahan, Ramage, Talwar and Zhang 2018, "Learning differentially private recurrent language
models" (ICLR), Algorithm 1 with the fixed-denominator estimator; the same construction as
Flower's ``DifferentialPrivacyServerSideFixedClipping``, which wraps any strategy. Per round:

1. each site's update becomes its delta from the round's global model, clipped to L2 norm
   ``C`` (:func:`clip_update`), so no site can move the sum by more than ``C``;
2. the clipped deltas go into the wrapped :class:`~medfed.aggregator.strategies.RoundAggregation`
   (a FedAvg stream) with *equal* weights, and their sum is divided by the round's cohort ``n``,
   the number of sites asked, fixed before any update is read (a site that fails counts as a
   zero delta);
3. Gaussian noise of standard deviation ``z * C / n`` is added to every coordinate of that mean,
   from a CSPRNG (:mod:`medfed.csprng`);
4. the server step runs on the noisy mean: FedAvg/FedProx take it as it is, FedAdam takes
   ``global - noisy mean`` as its pseudo-gradient. Everything after the noise is
   post-processing and costs nothing.

**Why equal weights.** The sites' released patient counts would make a site's share of the
mean ``w_k / sum(w)``: the noise must cover the largest share any site can have, and a
patient-weighted mean gives one large site nearly all of it. With equal weights and a fixed
denominator every site's sensitivity is ``C / n``, the smallest bound for the sum of weights,
and the denominator does not depend on any site's data (McMahan et al.'s ``f~_f`` estimator
with uniform weights). The unit protected is the whole site, under zero-out adjacency: one
site's update present, or replaced by nothing, within the round's cohort.

**Why sample rate 1.** Privacy amplification by subsampling needs the cohort to be a random
sample that the adversary does not see. medfed asks every site that is online and has budget
left, which is not random, so each round is accounted as one unsampled Gaussian mechanism.

Robust strategies (median, trimmed mean) are refused: an order statistic of clipped deltas is
not a bounded share of a mean, and noise sized for one would not cover it. Arrays that are not
floating point (counters) are not aggregated under central DP: the global model's are kept, so
nothing un-noised passes from a site to the released model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np

from medfed.aggregator.accumulate import layout_problems
from medfed.aggregator.site_level_ledger import SiteLevelEntry, SiteLevelLedger
from medfed.aggregator.strategies import (
    AggregationResult,
    FedAdam,
    FedAdamState,
    RoundAggregation,
)
from medfed.config.strategy import MEAN_STRATEGIES, CentralDPSettings, StrategySettings
from medfed.csprng import csprng_normals
from medfed.errors import AggregationError, ConfigError
from medfed.run_events import SiteLevelPrivacy
from medfed.types import SiteUpdate

__all__ = [
    "CentralDPAggregation",
    "check_central_dp",
    "clip_update",
    "round_aggregation",
    "site_level_event",
]

log = logging.getLogger("medfed.aggregator")

NoiseSource = Callable[..., np.ndarray]
"""``noise(count, std=...)``: ``count`` independent N(0, std^2) float64 values."""


def clip_update(
    *,
    weights: Mapping[str, np.ndarray],
    global_weights: Mapping[str, np.ndarray],
    clip_norm: float,
) -> tuple[dict[str, np.ndarray], float]:
    """A site's delta from the global model, scaled to L2 norm at most ``clip_norm``; and the
    delta's norm before clipping.

    The norm is over every floating-point array together (one vector, as DP-FedAvg clips), in
    float64. The delta is returned in float32, the dtype the aggregation sums in; if rounding
    to float32 left its norm a hair above ``clip_norm``, it is scaled down once more, so the
    bound holds for the values that are summed.
    """
    deltas = {
        name: np.subtract(weights[name], reference, dtype=np.float64)
        for name, reference in global_weights.items()
        if np.issubdtype(reference.dtype, np.floating)
    }
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in deltas.values()))
    if not math.isfinite(norm):
        raise AggregationError(
            f"an update's distance from the global model is not finite ({norm})",
            hint="validate updates with validate_update before aggregating",
        )
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped = {name: (d * factor).astype(np.float32) for name, d in deltas.items()}
    after = math.sqrt(
        sum(float(np.vdot(c, c)) for c in (a.astype(np.float64) for a in clipped.values()))
    )
    if after > clip_norm:
        shrink = np.float32(clip_norm / after * (1.0 - 2.0**-20))
        clipped = {name: c * shrink for name, c in clipped.items()}
    return clipped, norm


def check_central_dp(*, settings: StrategySettings, sites: int, secure_aggregation: bool) -> None:
    """Refuse central DP where its guarantee would not hold or mean little.

    Raises:
        ConfigError: a robust strategy; secure aggregation (the aggregator never sees a site's
            update, so it cannot clip one); a delta not below one over the number of sites.
    """
    dp = settings.central_dp
    if dp is None:
        return
    if settings.name not in MEAN_STRATEGIES:
        raise ConfigError(
            f"central_dp cannot wrap the {settings.name} strategy: its noise bounds one site's "
            "share of a mean, not an order statistic",
            hint=f"use one of {', '.join(MEAN_STRATEGIES)} with central_dp, or drop central_dp",
        )
    if secure_aggregation:
        raise ConfigError(
            "central_dp clips each site's update at the aggregator, which secure aggregation "
            "hides from it",
            hint="choose one: secure_aggregation or strategy.central_dp",
        )
    if dp.delta >= 1.0 / max(sites, 1):
        raise ConfigError(
            f"central_dp.delta {dp.delta:g} is not below 1 / {sites} sites: a mechanism that "
            "publishes one whole site's update at random would meet it",
            hint=f"set strategy.central_dp.delta well below {1.0 / max(sites, 1):g}, e.g. 1e-5",
        )


class CentralDPAggregation(RoundAggregation):
    """One round's DP-FedAvg: clipped deltas into the wrapped FedAvg stream, noise on the mean.

    The parent :class:`RoundAggregation` is the wrapped aggregation: it streams the clipped
    deltas (floating-point arrays only) with equal weights and gives their mean; this class
    rescales it to the fixed cohort, adds the noise, and runs the server step of
    ``settings.name``. The ledger entry is written in :meth:`finish`, before the noise is drawn.
    """

    def __init__(
        self,
        *,
        settings: StrategySettings,
        global_weights: Mapping[str, np.ndarray],
        cohort: int,
        ledger: SiteLevelLedger,
        run_name: str,
        round: int,
        rounds: int = 1,
        noise: NoiseSource = csprng_normals,
    ) -> None:
        if settings.central_dp is None or settings.name not in MEAN_STRATEGIES:
            raise ConfigError(
                f"central DP needs strategy.central_dp and a weighted-mean strategy "
                f"({', '.join(MEAN_STRATEGIES)}), not {settings.name}",
                hint="see check_central_dp",
            )
        if cohort < 1:
            raise AggregationError(f"a round's cohort must have at least one site, not {cohort}")
        floating = {
            name: array
            for name, array in global_weights.items()
            if np.issubdtype(array.dtype, np.floating)
        }
        super().__init__(
            settings=StrategySettings(name="fedavg"),
            global_weights=floating,
            round=round,
            rounds=rounds,
        )
        self.dp: CentralDPSettings = settings.central_dp
        self.cohort = cohort
        self.entry: SiteLevelEntry | None = None
        self.clipped = 0  # updates whose norm passed the clip (for the aggregator's log)
        self._strategy = settings
        self._full = global_weights
        self._full_layout = {name: tuple(array.shape) for name, array in global_weights.items()}
        self._ledger = ledger
        self._run_name = run_name
        self._noise = noise

    def add(self, *, update: SiteUpdate) -> None:
        """Clip ``update``'s delta and fold it in with weight 1 (its patient count is unused).

        Raises:
            AggregationError: The update does not fit the global model, or more updates than
                the cohort arrive.
        """
        differing = layout_problems(weights=update.weights, layout=self._full_layout)
        if differing:
            raise AggregationError(
                f"site {update.site_id!r}: arrays {differing[:5]} differ in name or shape "
                "from the global model",
                hint="validate updates with partition_updates before aggregating",
            )
        if len(self.sites) >= self.cohort:
            raise AggregationError(
                f"site {update.site_id!r}: more updates than the {self.cohort} sites asked",
                hint="a round's cohort is fixed when the round starts",
            )
        delta, norm = clip_update(
            weights=update.weights, global_weights=self._full, clip_norm=self.dp.clip_norm
        )
        self.clipped += norm > self.dp.clip_norm
        super().add(
            update=SiteUpdate(
                site_id=update.site_id, round=update.round, weights=delta, num_patients=1
            )
        )

    def finish(self, *, state: FedAdamState | None) -> AggregationResult:
        """Record the release, add the noise to the mean of the clipped deltas, step.

        Raises:
            AggregationError: No update was added.
        """
        added = len(self.sites)
        if not added:
            raise AggregationError(
                "no site updates to aggregate",
                hint="every site failed or was rejected this round; see the rejection reasons",
            )
        self.entry = self._ledger.append(
            run_name=self._run_name,
            round=self._round,
            noise_multiplier=self.dp.noise_multiplier,
            clip_norm=self.dp.clip_norm,
            sample_rate=1.0,
            cohort=self.cohort,
        )
        log.info(
            "central DP, round %d: %d of %d updates clipped to %g, noise std %g on the mean of %d",
            self._round,
            self.clipped,
            added,
            self.dp.clip_norm,
            self.dp.noise_multiplier * self.dp.clip_norm / self.cohort,
            self.cohort,
        )
        mean = super().finish(state=None).weights  # sum of clipped deltas / added
        share = added / self.cohort
        std = self.dp.noise_multiplier * self.dp.clip_norm / self.cohort
        noise = self._noise(sum(int(a.size) for a in mean.values()), std=std)
        average: dict[str, np.ndarray] = {}
        offset = 0
        for name, current in self._full.items():
            if name not in mean:
                average[name] = np.array(current)  # counters: the global model's, unchanged
                continue
            size = int(current.size)
            noisy = np.asarray(current, dtype=np.float64) + share * mean[name].astype(np.float64)
            noisy += noise[offset : offset + size].reshape(current.shape)
            offset += size
            average[name] = noisy.astype(np.float32)
        if self._strategy.name != "fedadam":
            return AggregationResult(weights=average, state=state)
        # the server step moves the aggregated (floating) arrays only; counters stay as kept
        server = FedAdam.from_settings(self._strategy, round=self._round, rounds=self._rounds)
        stepped, new_state = server.step_to(
            state=state,
            global_weights={name: self._full[name] for name in mean},
            average={name: average[name] for name in mean},
        )
        return AggregationResult(weights={**average, **stepped}, state=new_state)


def round_aggregation(
    *,
    settings: StrategySettings,
    global_weights: Mapping[str, np.ndarray],
    cohort: int,
    ledger: SiteLevelLedger | None,
    run_name: str,
    round: int,
    rounds: int,
) -> RoundAggregation:
    """The round's aggregation: plain, or wrapped in central DP when ``settings`` asks for it;
    ``round`` of ``rounds`` places it in the run (FedAdam's server rate schedule).

    Raises:
        ConfigError: central DP is asked for but no site-level ledger is given.
    """
    if settings.central_dp is None:
        return RoundAggregation(
            settings=settings, global_weights=global_weights, round=round, rounds=rounds
        )
    if ledger is None:
        raise ConfigError(
            "central DP needs the run's site-level ledger to record each release",
            hint="pass SiteLevelLedger(path=site_level_ledger_path(run directory))",
        )
    return CentralDPAggregation(
        settings=settings,
        global_weights=global_weights,
        cohort=cohort,
        ledger=ledger,
        run_name=run_name,
        round=round,
        rounds=rounds,
    )


def site_level_event(
    *, ledger: SiteLevelLedger, settings: StrategySettings, run_name: str, round: int, cohort: int
) -> SiteLevelPrivacy:
    """The run event that reports the site-level epsilon after ``round``, from the ledger."""
    dp = settings.central_dp
    if dp is None:
        raise ConfigError("site-level privacy is reported only with strategy.central_dp")
    summary = ledger.summary(delta=dp.delta)
    return SiteLevelPrivacy(
        run_name=run_name,
        round=round,
        site_level_epsilon=summary["site_level_epsilon"],
        delta=dp.delta,
        accountant=summary["accountant"],
        noise_multiplier=dp.noise_multiplier,
        clip_norm=dp.clip_norm,
        cohort=cohort,
        releases=summary["releases"],
    )
