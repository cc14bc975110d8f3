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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from medfed.errors import PrivacyError

if TYPE_CHECKING:  # numpy and scipy load only when an RDP curve is computed: the ledger
    # reads plans on every verification and must stay as fast to import as it was.
    import numpy as np
    import numpy.typing as npt

    Floats = npt.NDArray[np.float64]

#: Integer orders: Theorem 5 of Zhu and Wang holds at integer orders only.
DEFAULT_ORDERS: tuple[int, ...] = (*range(2, 129), 256)

BudgetView = Literal["distributed", "local"]
BUDGET_VIEWS: Final[tuple[BudgetView, ...]] = get_args(BudgetView)
#: Accountants whose composition of Gaussian RDP curves can stand in for a DDG step's RDP.
RDP_ACCOUNTANTS: Final[tuple[str, ...]] = ("rdp", "rdp-classic")


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
    import numpy as np

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
    from scipy import special

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
    coordinates of the rotated gradient (after padding for the rotation), ``local_stddev`` one
    site's share. ``count_weight`` is the integer each patient adds to one more coordinate, so
    that the sum also carries a noisy patient count; 0 means the vector has no such coordinate.
    """

    clip: float
    scale: float
    beta: float
    dim: int
    local_stddev: float
    count_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("clip", self.clip)
        _check_positive("scale", self.scale)
        _check_positive("local_stddev", self.local_stddev)
        if not _is_number(self.beta) or not 0.0 <= self.beta < 1.0:
            raise PrivacyError(
                f"beta is {self.beta!r}", hint="beta is a probability in [0, 1); 0: unconditional"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise PrivacyError(
                f"dim is {self.dim!r}", hint="dim counts the rotated vector's coordinates, >= 1"
            )
        weight = self.count_weight
        if not (_is_number(weight) and math.isfinite(weight) and weight >= 0.0):
            raise PrivacyError(
                f"count_weight is {weight!r}", hint="count_weight is >= 0 (0: no count)"
            )
        if not float(weight).is_integer():
            # The L1 bound of Prop. 14 (||x||_1 <= ||x||_2^2) holds for integer vectors only,
            # and the count coordinate is added unrounded.
            raise PrivacyError(
                f"count_weight is {weight!r}, not a whole number",
                hint="each patient adds a whole number of grid units to the count",
            )

    @property
    def coordinates(self) -> int:
        """The coordinates that get noise: the rotated gradient's, and the count's if any."""
        return self.dim + (1 if self.count_weight > 0 else 0)

    @property
    def l2_sensitivity(self) -> float:
        """One patient's rounded contribution's L2 bound, in grid units.

        The gradient part is rounded (Proposition 22); the count is an exact integer, so its
        weight adds in quadrature as it is.
        """
        rounded = rounded_l2_bound(l2_bound=self.clip * self.scale, beta=self.beta, dim=self.dim)
        if self.count_weight == 0:
            return rounded
        return math.sqrt(rounded**2 + float(self.count_weight) ** 2)

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
        l1 = rounded_l1_bound(l2_bound=l2, dim=self.coordinates)
        return ddg_rdp(
            l2_scale=l2 / summed,
            l1_scale=l1 / summed,
            tau=ddg_tau(local_stddev=self.local_stddev, sites=sites),
            dim=self.coordinates,
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


def gaussian_equivalent(*, noise: DistributedNoise, sites: int) -> float:
    """The Gaussian noise multiplier ``z`` whose unsampled RDP dominates one DDG step's.

    The first bound of Proposition 14 gives one step of ``sites`` shares
    ``alpha/2 L2^2 + tau d`` at order ``alpha`` (``L2`` the sensitivity over the summed
    noise's standard deviation ``sqrt(sites) local_stddev``, ``d`` the noised coordinates,
    ``tau`` of Theorem 1). For ``alpha >= 1``, ``tau d <= alpha tau d``, so
    ``alpha / (2 z^2)`` with ``1 / z^2 = L2^2 + 2 tau d`` is at least as large at every order,
    fractional ones included (the DDG's RDP at ``alpha`` in (1, 2) is at most its first bound
    there too). One site: ``tau = 0`` and ``z = local_stddev / l2_sensitivity``.

    A DDG step can therefore be charged as one ``DPSteps(z, 1.0, 1)`` and composed with
    DP-SGD steps by an RDP accountant (``rdp``, ``rdp-classic``): those add RDP curves and
    convert the sum, and the curve they add for ``z`` is never below the DDG's. It is not valid
    for PRV or PLD accountants: they compose the privacy loss distribution of a Gaussian, and
    an RDP bound does not bound the DDG's privacy loss distribution, so their epsilon for ``z``
    need not bound the DDG's.
    """
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise PrivacyError(f"sites is {sites!r}", hint="at least one site adds noise")
    l2 = noise.l2_sensitivity / (math.sqrt(sites) * noise.local_stddev)
    tau = ddg_tau(local_stddev=noise.local_stddev, sites=sites)
    return 1.0 / math.sqrt(l2**2 + 2.0 * tau * noise.coordinates)


_NOISE_FIELDS: Final = ("clip", "scale", "beta", "dim", "count_weight", "local_stddev")
_MULTIPLIER_FIELDS: Final = ("distributed_noise_multiplier", "local_noise_multiplier")
PLAN_FIELDS: Final[tuple[str, ...]] = ("sites", "budget", *_NOISE_FIELDS, *_MULTIPLIER_FIELDS)


@dataclass(frozen=True, kw_only=True)
class DistributedPlan:
    """A site's distributed-noise step, with both guarantees and the one its budget is kept on.

    ``sites`` is how many shares the distributed guarantee counts on (the secure aggregation
    threshold: at least that many sites added their share to any sum the aggregator can
    open). ``budget`` names the guarantee the site's cap is enforced on: ``"distributed"``
    trusts the other sites and secure aggregation, ``"local"`` only the site's own share.
    """

    noise: DistributedNoise
    sites: int
    budget: BudgetView

    def __post_init__(self) -> None:
        if not isinstance(self.noise, DistributedNoise):
            raise PrivacyError(
                f"noise is a {type(self.noise).__name__}", hint="pass a DistributedNoise"
            )
        if isinstance(self.sites, bool) or not isinstance(self.sites, int) or self.sites < 1:
            raise PrivacyError(
                f"sites is {self.sites!r}",
                hint="the distributed guarantee counts on at least one share (this site's)",
            )
        if self.budget not in BUDGET_VIEWS:
            raise PrivacyError(
                f"budget is {self.budget!r}", hint=f"use one of: {', '.join(BUDGET_VIEWS)}"
            )

    @property
    def distributed_noise_multiplier(self) -> float:
        """The Gaussian equivalent when ``sites`` shares were added and secure aggregation held."""
        return gaussian_equivalent(noise=self.noise, sites=self.sites)

    @property
    def local_noise_multiplier(self) -> float:
        """The Gaussian equivalent of this site's own share alone (the others colluding)."""
        return gaussian_equivalent(noise=self.noise, sites=1)

    def noise_multiplier(self, view: BudgetView) -> float:
        """The Gaussian equivalent of one view."""
        if view == "distributed":
            return self.distributed_noise_multiplier
        if view == "local":
            return self.local_noise_multiplier
        raise PrivacyError(f"view is {view!r}", hint=f"use one of: {', '.join(BUDGET_VIEWS)}")

    @property
    def enforced_noise_multiplier(self) -> float:
        """The multiplier the site's budget is charged at: the one ``budget`` names."""
        return self.noise_multiplier(self.budget)

    def to_json(self) -> dict[str, Any]:
        """The ledger's ``distributed`` field: the parameters and both multipliers."""
        noise = self.noise
        return {
            "sites": self.sites,
            "budget": self.budget,
            "clip": float(noise.clip),
            "scale": float(noise.scale),
            "beta": float(noise.beta),
            "dim": noise.dim,
            "count_weight": float(noise.count_weight),
            "local_stddev": float(noise.local_stddev),
            "distributed_noise_multiplier": self.distributed_noise_multiplier,
            "local_noise_multiplier": self.local_noise_multiplier,
        }

    @classmethod
    def from_json(cls, obj: object) -> DistributedPlan:
        """Read :meth:`to_json`'s object back, every field checked (PrivacyError names it).

        The stored multipliers must be positive numbers; whether they match the parameters is
        the ledger verifier's check (:mod:`medfed.privacy.ledger`), which names the entry.
        """
        if not isinstance(obj, Mapping):
            raise PrivacyError(
                f"a distributed plan is a JSON object, got {type(obj).__name__}",
                hint=f"give the fields {', '.join(PLAN_FIELDS)}",
            )
        missing = [name for name in PLAN_FIELDS if name not in obj]
        unknown = sorted(str(name) for name in obj if name not in PLAN_FIELDS)
        if missing or unknown:
            parts = [f"missing fields {', '.join(missing)}"] if missing else []
            parts += [f"unknown fields {', '.join(unknown)}"] if unknown else []
            raise PrivacyError(
                f"distributed plan: {'; '.join(parts)}",
                hint=f"a distributed plan has exactly {', '.join(PLAN_FIELDS)}",
            )
        for name in ("sites", "dim"):
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivacyError(
                    f"distributed plan field {name!r}: expected an integer >= 1, got {value!r}",
                    hint=f"{name} is a whole number of at least 1",
                )
        for name in (*_NOISE_FIELDS, *_MULTIPLIER_FIELDS):
            if name != "dim" and not _is_number(obj[name]):
                raise PrivacyError(
                    f"distributed plan field {name!r}: expected a number, got {obj[name]!r}",
                    hint=f"{name} is a finite number",
                )
        for name in _MULTIPLIER_FIELDS:
            if not 0.0 < obj[name] < math.inf:
                raise PrivacyError(
                    f"distributed plan field {name!r}: must be a finite number > 0, "
                    f"got {obj[name]!r}",
                    hint="a Gaussian equivalent is a positive noise multiplier",
                )
        try:
            noise = DistributedNoise(**{name: obj[name] for name in _NOISE_FIELDS})
            return cls(noise=noise, sites=obj["sites"], budget=obj["budget"])
        except PrivacyError as exc:
            raise PrivacyError(f"distributed plan: {exc.message}", hint=exc.hint) from None


def epsilon_from_rdp(*, rdp: Floats, orders: Sequence[int], delta: float) -> float:
    """The smallest epsilon over ``orders``, by the conversion Opacus' RDP accountant uses.

    Balle et al. 2020 / Canonne, Kamath, Steinke 2020:
    ``eps = rdp - (log(delta) + log(alpha)) / (alpha - 1) + log((alpha - 1) / alpha)``.
    """
    import numpy as np

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
    count_weight: float = 0.0,
) -> float:
    """The smallest share (grid units, to 0.1%) that keeps ``sites`` shares within the target."""
    _check_positive("target_epsilon", target_epsilon)

    def spent(stddev: float) -> float:
        noise = DistributedNoise(
            clip=clip,
            scale=scale,
            beta=beta,
            dim=dim,
            local_stddev=stddev,
            count_weight=count_weight,
        )
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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _check_positive(name: str, value: float) -> None:
    if not (_is_number(value) and math.isfinite(value) and value > 0):
        raise PrivacyError(f"{name} is {value}", hint=f"{name} must be a positive finite number")
