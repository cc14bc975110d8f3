"""Accounting for the distributed discrete Gaussian: each site adds a share of the noise.

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021 (https://arxiv.org/abs/2102.06387). Under secure
aggregation the aggregator sees only the sum of the sites' vectors, so ``n`` sites that each add
discrete Gaussian noise of variance ``sigma^2`` (on the integer grid the vectors are rounded to)
give a sum that carries noise of variance ``n sigma^2``: each site needs ``sqrt(n)`` times less
noise for the same guarantee. The sum of discrete Gaussians is not exactly a discrete Gaussian;
Theorem 1 bounds the difference by ``tau`` (:func:`ddg_tau`) and Proposition 14 (Eq. 17) turns
it into Renyi DP (:func:`ddg_rdp`). Rounding to the grid inflates the sensitivity; conditional
randomized rounding (Proposition 22) bounds the inflation (:func:`rounded_l2_bound`).

Sampling is amplified with the upper bound of Zhu and Wang, "Poisson Subsampled Renyi
Differential Privacy", ICML 2019, Theorem 5, valid for any mechanism at integer orders, and
RDP becomes (epsilon, delta) with the conversion the site's ``rdp`` accountant uses.

All quantities here are on the integer grid: ``scale`` is the factor a site multiplies its
clipped vector by before rounding (``1 / gamma`` in the paper), ``local_stddev`` the standard
deviation of each site's discrete Gaussian share in grid units. The patient-level sensitivity is
one patient's rounded, clipped contribution: a site rounds each patient's scaled gradient on its
own, so adding or removing that patient changes the site's integer sum by exactly that vector.

Two guarantees follow for a site, and the ledger records both: the *distributed* epsilon (at
least ``sites`` sites added their share and secure aggregation held) and the *local* epsilon
(its own share alone, ``sites = 1``: what is left if the others colluded with the aggregator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

from medfed.errors import PrivacyError

#: Integer orders: Theorem 5 of Zhu and Wang holds at integer orders only.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 129), 256)

Floats = npt.NDArray[np.float64]


def ddg_tau(*, local_stddev: float, sites: int) -> float:
    """``tau`` of Theorem 1: how far the sum of ``sites`` discrete Gaussians is from one.

    ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``; zero for one site, and
    negligible once ``sigma`` (in grid units) is a few units.
    """
    _check_positive("local_stddev", local_stddev)
    if sites < 1:
        raise PrivacyError(f"sites is {sites}", hint="at least one site adds noise")
    exponent = -2.0 * (math.pi * local_stddev) ** 2
    return 10.0 * sum(math.exp(exponent * k / (k + 1)) for k in range(1, sites))


def rounded_l2_bound(*, l2_bound: float, beta: float, dim: int) -> float:
    """The L2 norm bound after conditional randomized rounding to the grid (Proposition 22).

    Rounding each coordinate up or down at random moves a vector by at most ``sqrt(dim)``;
    conditioning on the rounded norm staying within
    ``sqrt(c^2 + dim / 4 + sqrt(2 ln(1 / beta)) (c + sqrt(dim) / 2))`` gives the tighter bound,
    at the price of a retry with probability at most ``beta``. ``beta = 0``: unconditional.
    """
    _check_positive("l2_bound", l2_bound)
    if not 0.0 <= beta < 1.0:
        raise PrivacyError(f"beta is {beta}", hint="beta is a probability in [0, 1)")
    if dim < 1:
        raise PrivacyError(f"dim is {dim}", hint="a vector has at least one coordinate")
    plain = l2_bound + math.sqrt(dim)
    if beta == 0.0:
        return plain
    squared = l2_bound**2 + dim / 4.0
    squared += math.sqrt(2.0 * math.log(1.0 / beta)) * (l2_bound + math.sqrt(dim) / 2.0)
    return min(plain, math.sqrt(squared))


def rounded_l1_bound(*, l2_bound: float, dim: int) -> float:
    """An L1 bound for an integer vector of L2 norm at most ``l2_bound``.

    ``||x||_1 <= sqrt(dim) ||x||_2`` always, and ``||x||_1 <= ||x||_2^2`` for integer vectors.
    """
    return l2_bound * min(math.sqrt(dim), l2_bound)


def ddg_rdp(
    *,
    l2_scale: float,
    l1_scale: float,
    tau: float,
    dim: int,
    sample_rate: float,
    steps: int,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> Floats:
    """Renyi DP of ``steps`` sampled distributed discrete Gaussian steps, one value per order.

    ``l2_scale`` and ``l1_scale`` are the sensitivities divided by the standard deviation of the
    *summed* noise. Per step (Proposition 14, Eq. 17) the mechanism is
    ``(alpha, min(a/2 L2^2 + tau d, a/2 (L2^2 + 2 L1 tau + tau^2 d), a/2 (L2 + sqrt(d) tau)^2))``
    -RDP; with ``tau = 0`` that is the continuous Gaussian's ``alpha L2^2 / 2``.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(f"sample_rate is {sample_rate}", hint="a rate in (0, 1]")
    if steps < 0:
        raise PrivacyError(f"steps is {steps}", hint="steps count up from 0")

    def per_step(order: int) -> float:
        half = order / 2.0
        return min(
            half * l2_scale**2 + tau * dim,
            half * (l2_scale**2 + 2.0 * l1_scale * tau + tau**2 * dim),
            half * (l2_scale + math.sqrt(dim) * tau) ** 2,
        )

    values = []
    for order in orders:
        if int(order) != order or order < 2:
            raise PrivacyError(f"RDP order {order}", hint="use integer orders of at least 2")
        plain = per_step(int(order))
        if sample_rate < 1.0:
            plain = min(plain, _subsampled(int(order), sample_rate, per_step))
        values.append(plain)
    return np.asarray(values, dtype=np.float64) * steps


def _subsampled(order: int, rate: float, per_step: Callable[[int], float]) -> float:
    """Zhu and Wang 2019, Theorem 5: Poisson subsampling of any mechanism at an integer order."""
    log_terms = [0.0, per_step(2)]
    weights = [
        (1.0 - rate) ** (order - 1) * (order * rate - rate + 1.0),
        special.comb(order, 2) * rate**2 * (1.0 - rate) ** (order - 2),
    ]
    for j in range(3, order + 1):
        log_binomial = special.gammaln(order + 1) - special.gammaln(j + 1)
        log_binomial -= special.gammaln(order - j + 1)
        log_terms.append(
            (j - 1) * per_step(j)
            + log_binomial
            + (order - j) * math.log1p(-rate)
            + j * math.log(rate)
        )
        weights.append(3.0)
    return float(special.logsumexp(a=log_terms, b=weights)) / (order - 1)


@dataclass(frozen=True, kw_only=True)
class DistributedNoise:
    """One site's distributed discrete Gaussian setting, everything on the integer grid.

    ``clip`` is the L2 clipping bound of one patient's gradient (before scaling), ``scale`` the
    factor to the grid, ``beta`` the conditional rounding's parameter, ``dim`` the number of
    coordinates (after padding for the rotation), ``local_stddev`` one site's share.
    """

    clip: float
    scale: float
    beta: float
    dim: int
    local_stddev: float

    def __post_init__(self) -> None:
        _check_positive("clip", self.clip)
        _check_positive("scale", self.scale)
        _check_positive("local_stddev", self.local_stddev)

    @property
    def l2_sensitivity(self) -> float:
        """One patient's rounded contribution's L2 bound, in grid units."""
        return rounded_l2_bound(l2_bound=self.clip * self.scale, beta=self.beta, dim=self.dim)

    def rdp(
        self,
        *,
        sites: int,
        sample_rate: float,
        steps: int,
        orders: Sequence[int] = DEFAULT_ORDERS,
    ) -> Floats:
        """RDP when ``sites`` sites (this one included) each add their share."""
        summed = math.sqrt(sites) * self.local_stddev
        l2 = self.l2_sensitivity
        l1 = rounded_l1_bound(l2_bound=l2, dim=self.dim)
        return ddg_rdp(
            l2_scale=l2 / summed,
            l1_scale=l1 / summed,
            tau=ddg_tau(local_stddev=self.local_stddev, sites=sites),
            dim=self.dim,
            sample_rate=sample_rate,
            steps=steps,
            orders=orders,
        )

    def epsilon(self, *, sites: int, sample_rate: float, steps: int, delta: float) -> float:
        """(epsilon, delta) of ``steps`` steps with ``sites`` shares; ``sites=1``: local alone."""
        return epsilon_from_rdp(
            rdp=self.rdp(sites=sites, sample_rate=sample_rate, steps=steps),
            orders=DEFAULT_ORDERS,
            delta=delta,
        )


def epsilon_from_rdp(*, rdp: Floats, orders: Sequence[int], delta: float) -> float:
    """The smallest epsilon over ``orders``, by the conversion Opacus' RDP accountant uses.

    Balle et al. 2020 / Canonne, Kamath, Steinke 2020:
    ``eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)``.
    """
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta is {delta}", hint="delta is a probability in (0, 1)")
    alphas = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = (
            rdp
            - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
            + np.log((alphas - 1.0) / alphas)
        )
    if np.isnan(eps).all():
        return math.inf
    return float(max(np.nanmin(eps), 0.0))


def local_stddev_for_epsilon(
    *,
    target_epsilon: float,
    delta: float,
    sites: int,
    sample_rate: float,
    steps: int,
    clip: float,
    scale: float,
    beta: float,
    dim: int,
) -> float:
    """The smallest share (grid units, to 0.1%) that keeps ``sites`` shares within the target."""
    _check_positive("target_epsilon", target_epsilon)

    def spent(stddev: float) -> float:
        noise = DistributedNoise(clip=clip, scale=scale, beta=beta, dim=dim, local_stddev=stddev)
        return noise.epsilon(sites=sites, sample_rate=sample_rate, steps=steps, delta=delta)

    low, high = 1e-3, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e12:
            raise PrivacyError(
                f"no noise reaches epsilon {target_epsilon:g} in {steps} steps",
                hint="raise the target epsilon or lower the steps or the sample rate",
            )
    while high - low > 1e-3 * high:
        middle = (low + high) / 2.0
        low, high = (middle, high) if spent(middle) > target_epsilon else (low, middle)
    return high


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise PrivacyError(f"{name} is {value}", hint=f"{name} must be a positive finite number")
