"""Privacy accounting for DP-SGD: epsilon from a history of Poisson-subsampled Gaussian steps.

Pure computation, no I/O. Every accountant composes the *whole* history at once: the privacy
loss of a site is one composition over all its rounds, never a sum of per-round epsilons (which
over-reports) nor the epsilon of the last round (which under-reports).

Accountants and the RDP-to-(epsilon, delta) conversion each one uses:

* ``rdp``: Opacus' RDP analysis with its default orders and the improved conversion of
  Balle et al. 2020 (what Opacus, TF Privacy and dp-accounting print today);
* ``rdp-classic``: the same RDP curve with the classic conversion of Mironov 2017,
  ``min_alpha rdp(alpha) + log(1/delta)/(alpha-1)``, which older publications used (it gives
  epsilon higher by up to about 30%);
* ``prv``: Opacus' PRV accountant (Gopi et al. 2021), its upper bound at eps_error 0.01;
* ``pld``: Google dp-accounting's PLD accountant, add/remove-one adjacency, discretisation 1e-4.

Adaptive clipping (Andrew et al. 2021) releases a noisy clip count beside each step's clipped
sum; :func:`adaptive_clipping_noise` splits a planned noise multiplier between the two so that
the pair is one Gaussian mechanism at that multiplier, which is what every accountant charges.

Heavy libraries are imported inside the functions so that ``import medfed.privacy`` stays fast.

Epsilon is a pure function of the merged history, delta and accountant, and the aggregator asks
for every site's epsilon each round, so results are memoised per process on exactly those
inputs, and the RDP accountants keep each (noise, rate) pair's one-step curve: a history that
grew by a round at the same settings costs a multiplication, not the whole curve again. Both
give the numbers a fresh computation gives, bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from medfed.errors import PrivacyError

AccountantName = Literal["rdp", "rdp-classic", "prv", "pld"]
ACCOUNTANTS: Final[tuple[str, ...]] = get_args(AccountantName)

CONVERSIONS: Final[Mapping[str, str]] = {
    "rdp": "rdp-improved (Balle et al. 2020; Opacus default orders)",
    "rdp-classic": "rdp-classic (Mironov 2017; Opacus default orders)",
    "prv": "prv-upper-bound (Gopi et al. 2021; Opacus, eps_error 0.01)",
    "pld": "pld (dp-accounting; add/remove-one, discretisation 1e-4)",
}

PLD_DISCRETISATION: Final = 1e-4
_MAX_NOISE: Final = 2.0**20


@dataclass(frozen=True, slots=True)
class DPSteps:
    """``steps`` DP-SGD steps at one noise multiplier and one Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        check_sample_rate(self.sample_rate)
        check_steps(self.steps)


@dataclass(frozen=True, slots=True)
class AdaptiveClippingNoise:
    """The noise of one DP-SGD step with adaptive clipping, which spends as plain DP-SGD does.

    ``noise_multiplier`` is what the accountant charges (the ledger's); the clipped sum gets
    Gaussian noise of ``sum_noise_multiplier`` times the clip, and the count of patients within
    the clip (each adds ``b - 1/2``, so its sensitivity is 1/2) gets noise of standard
    deviation ``count_std = count_noise_multiplier / 2`` patients.
    """

    noise_multiplier: float
    sum_noise_multiplier: float
    count_noise_multiplier: float

    @property
    def count_std(self) -> float:
        return self.count_noise_multiplier / 2.0


def composed_noise_multiplier(
    *, sum_noise_multiplier: float, count_noise_multiplier: float
) -> float:
    """The one Gaussian mechanism that the clipped sum and the clip count are together.

    Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
    clipping" (arXiv:1905.03871), Theorem 1: noise multiplier ``z_sum`` on the sum (sensitivity
    C) and standard deviation ``sigma_b`` on the count of shifted bits (sensitivity 1/2) are one
    Gaussian mechanism on the concatenated vector, with ``z = (z_sum^-2 + (2 sigma_b)^-2)^-1/2``.
    One sampled patient moves both at once, which is why their squared ratios add.
    """
    check_noise_multiplier(sum_noise_multiplier)
    check_noise_multiplier(count_noise_multiplier)
    return float((sum_noise_multiplier**-2 + count_noise_multiplier**-2) ** -0.5)


def adaptive_clipping_noise(
    *, noise_multiplier: float, count_noise_multiplier: float
) -> AdaptiveClippingNoise:
    """Split the planned ``noise_multiplier`` between the clipped sum and the clip count.

    The paper's ``sigma_delta = (z^-2 - (2 sigma_b)^-2)^-1/2`` (the same formula as TensorFlow
    Federated's ``adaptive_clip_noise_params``), rounded up until the pair composes to at
    least ``z``: the ledger charges ``z``, and the pair never has less noise than that.
    ``count_noise_multiplier`` is ``2 sigma_b`` and must exceed ``z``.
    """
    check_noise_multiplier(noise_multiplier)
    check_noise_multiplier(count_noise_multiplier)
    if count_noise_multiplier <= noise_multiplier:
        raise PrivacyError(
            f"adaptive clipping's count noise multiplier {count_noise_multiplier:g} must exceed "
            f"the noise multiplier {noise_multiplier:g}: the count would spend all of the step's "
            "privacy, and more",
            hint="raise privacy.adaptive_clipping.count_noise_multiplier (3 to 10 times the "
            "noise multiplier costs the sum 6% to 0.5% more noise)",
        )
    sum_noise = (noise_multiplier**-2 - count_noise_multiplier**-2) ** -0.5
    while (
        composed_noise_multiplier(
            sum_noise_multiplier=sum_noise, count_noise_multiplier=count_noise_multiplier
        )
        < noise_multiplier
    ):
        sum_noise = math.nextafter(sum_noise, math.inf)
    return AdaptiveClippingNoise(
        noise_multiplier=float(noise_multiplier),
        sum_noise_multiplier=float(sum_noise),
        count_noise_multiplier=float(count_noise_multiplier),
    )


def check_sample_rate(value: float) -> None:
    """Refuse a sampling rate outside (0, 1]."""
    if not _is_real(value) or not 0.0 < value <= 1.0:
        raise PrivacyError(
            f"sample rate must be in (0, 1], got {value!r}",
            hint="sample rate = expected batch size / number of patients",
        )


def check_noise_multiplier(value: float) -> None:
    """Refuse a noise multiplier that is not a finite positive number."""
    if not _is_real(value) or not 0.0 < value < math.inf:
        raise PrivacyError(
            f"noise multiplier must be a finite number > 0, got {value!r}",
            hint="DP-SGD needs noise; typical values are 0.5 to 3",
        )


def check_steps(value: int) -> None:
    """Refuse a step count that is not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyError(
            f"steps must be an integer >= 0, got {value!r}",
            hint="steps = epochs x (patients / batch size), rounded up",
        )


def check_delta(value: float) -> None:
    """Refuse a delta outside (0, 1)."""
    if not _is_real(value) or not 0.0 < value < 1.0:
        raise PrivacyError(
            f"delta must be in (0, 1), got {value!r}",
            hint="use delta well below 1/(number of patients), e.g. 1e-5",
        )


def check_accountant(name: str) -> AccountantName:
    """Return ``name`` as an accountant name, or refuse it."""
    if name not in ACCOUNTANTS:
        raise PrivacyError(
            f"unknown accountant {name!r}", hint=f"use one of: {', '.join(ACCOUNTANTS)}"
        )
    return name  # type: ignore[return-value]


def conversion_of(accountant: str) -> str:
    """How an accountant turns its privacy curve into epsilon (for reports next to each number)."""
    return CONVERSIONS[check_accountant(accountant)]


def compute_epsilon(
    *, history: Sequence[DPSteps], delta: float, accountant: AccountantName
) -> float:
    """Epsilon at ``delta`` after composing every entry of ``history`` in one accountant.

    An empty history (or one with only zero-step entries) is 0.0. The result can be ``inf``
    when the accountant can give no finite bound (tiny noise, huge sampling rate).
    """
    check_delta(delta)
    name = check_accountant(accountant)
    merged = _merge(history)
    if not merged:
        return 0.0
    return _cached_epsilon(name, tuple(merged), float(delta))


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(
    accountant: AccountantName, merged: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    """:func:`compute_epsilon` past its checks, memoised on its exact inputs.

    The key keeps the merged history's order: composing in another order can round the sums
    differently, and a cached answer must be the one a fresh computation gives. Errors are
    not cached.
    """
    return float(_METHODS[accountant](list(merged), delta))


def noise_for_target_epsilon(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose ``steps`` steps alone stay at or below ``target_epsilon``.

    A bracketing search (doubling or halving, then secant steps kept inside the bracket): the
    returned multiplier is always one whose epsilon was computed and found at or below the
    target, within ``tolerance`` of it unless the bracket collapsed first.
    """
    if not _is_real(target_epsilon) or not 0.0 < target_epsilon < math.inf:
        raise PrivacyError(
            f"target epsilon must be a finite number > 0, got {target_epsilon!r}",
            hint="choose a per-round target such as 1.0",
        )
    if not _is_real(tolerance) or tolerance <= 0.0:
        raise PrivacyError(f"tolerance must be > 0, got {tolerance!r}")
    check_sample_rate(sample_rate)
    check_steps(steps)
    check_delta(delta)
    check_accountant(accountant)
    if steps == 0:
        raise PrivacyError(
            "no noise multiplier can be calibrated for 0 steps",
            hint="plan at least one training step",
        )

    def epsilon_at(noise: float) -> float:
        history = [DPSteps(noise_multiplier=noise, sample_rate=sample_rate, steps=steps)]
        with warnings.catch_warnings():
            # Probes at very small noise push the optimal order to the edge of the grid;
            # Opacus warns about that, which says nothing about the answer we return.
            warnings.simplefilter("ignore", UserWarning)
            return compute_epsilon(history=history, delta=delta, accountant=accountant)

    # The numerical accountants are slow at small noise: start them from the cheap RDP answer,
    # which is close to theirs (RDP bounds are a little looser).
    start = 1.0
    if accountant not in ("rdp", "rdp-classic"):
        with contextlib.suppress(PrivacyError):
            # RDP cannot go below about log(1/delta)/(max order - 1); PLD and PRV can.
            start = noise_for_target_epsilon(
                target_epsilon=target_epsilon,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant="rdp",
                tolerance=tolerance,
            )
    # Invariant from here on: epsilon_at(low) > target >= epsilon_at(high) = eps_high.
    high, eps_high = start, epsilon_at(start)
    low, eps_low = 0.0, math.inf
    while eps_high > target_epsilon:
        low, eps_low = high, eps_high
        high *= 2.0
        if high > _MAX_NOISE:
            raise PrivacyError(
                f"target epsilon {target_epsilon} cannot be reached: with noise multiplier "
                f"{low:g} the {accountant} accountant still gives {eps_low:.4g} (sample rate "
                f"{sample_rate}, {steps} steps, delta {delta})",
                hint="raise the target epsilon or delta, or use the pld accountant",
            )
        eps_high = epsilon_at(high)
    while low == 0.0 and target_epsilon - eps_high > tolerance and high > 1e-6:
        candidate = high / 2.0
        eps_candidate = epsilon_at(candidate)
        if eps_candidate > target_epsilon:
            low, eps_low = candidate, eps_candidate
        else:
            high, eps_high = candidate, eps_candidate
    for _ in range(200):
        width = high - low
        if target_epsilon - eps_high <= tolerance or width <= 1e-9 * high:
            break
        middle = _secant_log_log(low, eps_low, high, eps_high, target_epsilon)
        # Kept off the bracket's ends so that the bracket always shrinks.
        middle = min(max(middle, low + 0.05 * width), high - 0.05 * width)
        eps_middle = epsilon_at(middle)
        if eps_middle <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low, eps_low = middle, eps_middle
    return high


def _secant_log_log(
    low: float, eps_low: float, high: float, eps_high: float, target: float
) -> float:
    """Where the line through the bracket's ends in (log noise, log epsilon) meets the target.

    Epsilon falls roughly as a power of the noise multiplier, so this lands close to the
    answer; without a usable lower end it is plain bisection.
    """
    if low <= 0.0 or not math.isfinite(eps_low) or eps_high <= 0.0:
        return (low + high) / 2.0
    fraction = math.log(eps_low / target) / math.log(eps_low / eps_high)
    return math.exp(math.log(low) + fraction * math.log(high / low))


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _merge(history: Sequence[DPSteps]) -> list[tuple[float, float, int]]:
    """(noise, rate, steps) with equal (noise, rate) pairs summed and zero-step entries dropped.

    Composition is commutative, so this changes no epsilon; it keeps the numerical
    accountants (PRV, PLD) at one convolution per distinct setting however long the ledger.
    """
    totals: dict[tuple[float, float], int] = {}
    for entry in history:
        if not isinstance(entry, DPSteps):
            raise PrivacyError(f"history entries must be DPSteps, got {type(entry).__name__}")
        if entry.steps:
            key = (float(entry.noise_multiplier), float(entry.sample_rate))
            totals[key] = totals.get(key, 0) + entry.steps
    return [(noise, rate, steps) for (noise, rate), steps in totals.items()]


def _opacus_rdp() -> Any:
    """Opacus' RDP analysis module, imported without letting Opacus touch the root logger."""
    root = logging.getLogger()
    before = list(root.handlers)
    from opacus.accountants.analysis import rdp

    # Importing Opacus runs logging.basicConfig, which would print every log line twice in an
    # application that configured logging itself; undo only what that import added.
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
    return rdp


def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants.rdp import RDPAccountant

    return tuple(float(order) for order in RDPAccountant.DEFAULT_ALPHAS)


def one_step_rdp(
    *, noise_multiplier: float, sample_rate: float, orders: Sequence[float] | None = None
) -> Any:
    """Opacus' RDP of one DP-SGD step at each of ``orders`` (default: Opacus' own), as a
    read-only float array shared by every caller in the process.

    ``compute_rdp`` returns the one-step curve times ``steps``, so this times ``steps`` is its
    answer for any number of steps, to the bit.
    """
    grid = _rdp_orders() if orders is None else tuple(float(order) for order in orders)
    return _rdp_per_step(float(noise_multiplier), float(sample_rate), grid)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise: float, rate: float, orders: tuple[float, ...]) -> Any:
    import numpy as np

    curve = np.asarray(
        _opacus_rdp().compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=list(orders)),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def _rdp_curve(merged: list[tuple[float, float, int]]) -> tuple[Any, Any]:
    import numpy as np

    curve = sum(
        one_step_rdp(noise_multiplier=noise, sample_rate=rate) * steps
        for noise, rate, steps in merged
    )
    return np.array(_rdp_orders()), np.asarray(curve, dtype=float)


def _epsilon_rdp(merged: list[tuple[float, float, int]], delta: float) -> float:
    orders, curve = _rdp_curve(merged)
    epsilon, _ = _opacus_rdp().get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(epsilon)


def _epsilon_rdp_classic(merged: list[tuple[float, float, int]], delta: float) -> float:
    import numpy as np

    orders, curve = _rdp_curve(merged)
    epsilons = curve + math.log(1.0 / delta) / (orders - 1.0)
    if np.isnan(epsilons).all():
        return math.inf
    return float(np.nanmin(epsilons))


def _epsilon_prv(merged: list[tuple[float, float, int]], delta: float) -> float:
    import numpy as np

    _opacus_rdp()
    from opacus.accountants.prv import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(merged)
    try:
        # Overflow inside the PRV discretisation ends as an infinite (still valid) upper bound.
        with np.errstate(all="ignore"):
            return float(accountant.get_epsilon(delta))
    except (ValueError, ArithmeticError) as exc:
        raise PrivacyError(
            f"the PRV accountant cannot bound this history ({exc})",
            hint="use the rdp accountant for this setting",
        ) from None


def _epsilon_pld(merged: list[tuple[float, float, int]], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETISATION,
    )
    for noise, rate, steps in merged:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


_METHODS: Final[Mapping[str, Callable[[list[tuple[float, float, int]], float], float]]] = {
    "rdp": _epsilon_rdp,
    "rdp-classic": _epsilon_rdp_classic,
    "prv": _epsilon_prv,
    "pld": _epsilon_pld,
}
