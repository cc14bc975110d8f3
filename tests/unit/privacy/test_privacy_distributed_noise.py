"""The distributed discrete Gaussian's accounting against Opacus' Gaussian RDP and the paper."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.rdp import RDPAccountant

from medfed.errors import PrivacyError
from medfed.privacy.distributed_noise import (
    DEFAULT_ORDERS,
    DistributedNoise,
    DistributedPlan,
    ddg_rdp,
    ddg_tau,
    epsilon_from_rdp,
    gaussian_equivalent,
    local_stddev_for_epsilon,
    rounded_l1_bound,
    rounded_l2_bound,
)

ORDERS = list(DEFAULT_ORDERS)


def test_tau_is_zero_for_one_site_and_follows_theorem_1() -> None:
    assert ddg_tau(local_stddev=0.7, sites=1) == 0.0
    sigma = 0.5
    expected = 10 * (
        math.exp(-2 * math.pi**2 * sigma**2 / 2) + math.exp(-2 * math.pi**2 * sigma**2 * 2 / 3)
    )
    assert ddg_tau(local_stddev=sigma, sites=3) == pytest.approx(expected, rel=1e-12)
    assert ddg_tau(local_stddev=sigma, sites=3) == pytest.approx(1.2206373471865504, rel=1e-12)
    assert ddg_tau(local_stddev=3.0, sites=100) < 1e-30


def test_without_tau_and_sampling_it_is_the_gaussian_mechanism() -> None:
    z = 1.3
    ours = ddg_rdp(
        l2_scale=1 / z, l1_scale=1 / z, tau=0.0, dim=10, sample_rate=1.0, steps=5, orders=ORDERS
    )
    reference = np.asarray(
        opacus_rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=5, orders=ORDERS)
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    epsilon = epsilon_from_rdp(rdp=ours, orders=ORDERS, delta=1e-5)
    expected, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=reference, delta=1e-5)
    assert epsilon == pytest.approx(float(expected), rel=1e-12)
    assert epsilon == pytest.approx(9.005021392145272, rel=1e-9)


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_sampled_steps_bound_the_exact_sampled_gaussian_from_above(rate: float) -> None:
    """Zhu and Wang's bound holds for any mechanism, so it is never below Mironov's exact RDP."""
    z = 1.3
    ours = ddg_rdp(
        l2_scale=1 / z, l1_scale=1 / z, tau=0.0, dim=10, sample_rate=rate, steps=100, orders=ORDERS
    )
    exact = np.asarray(opacus_rdp.compute_rdp(q=rate, noise_multiplier=z, steps=100, orders=ORDERS))
    assert (ours >= exact - 1e-9).all()
    ours_eps = epsilon_from_rdp(rdp=ours, orders=ORDERS, delta=1e-5)
    exact_eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=exact, delta=1e-5)
    assert float(exact_eps) * (1 - 1e-12) <= ours_eps <= 1.35 * float(exact_eps)


def test_rounding_inflates_the_sensitivity_by_the_stated_bounds() -> None:
    assert rounded_l2_bound(l2_bound=100.0, beta=0.0, dim=400) == pytest.approx(120.0)
    conditioned = rounded_l2_bound(l2_bound=100.0, beta=math.exp(-0.5), dim=400)
    assert conditioned == pytest.approx(math.sqrt(100.0**2 + 100 + 1.0 * (100 + 10)))
    assert rounded_l1_bound(l2_bound=3.0, dim=100) == 9.0
    assert rounded_l1_bound(l2_bound=30.0, dim=100) == 300.0


def test_shares_from_more_sites_give_a_smaller_epsilon_than_one_share_alone() -> None:
    noise = DistributedNoise(
        clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=60.0
    )
    local = noise.epsilon(sites=1, sample_rate=1.0, steps=10, delta=1e-5)
    distributed = noise.epsilon(sites=9, sample_rate=1.0, steps=10, delta=1e-5)
    # Nine shares: three times the summed noise; tau is negligible at this sigma.
    assert distributed < local / 2.5
    plain = DistributedNoise(
        clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=180.0
    )
    assert distributed == pytest.approx(
        plain.epsilon(sites=1, sample_rate=1.0, steps=10, delta=1e-5)
    )


def test_the_planned_share_meets_the_target_and_a_smaller_one_does_not() -> None:
    settings = {"clip": 1.0, "scale": 64.0, "beta": math.exp(-0.5), "dim": 1 << 12}
    share = local_stddev_for_epsilon(
        target_epsilon=4.0, delta=1e-5, sites=4, sample_rate=0.5, steps=20, **settings
    )
    spent = DistributedNoise(local_stddev=share, **settings).epsilon(
        sites=4, sample_rate=0.5, steps=20, delta=1e-5
    )
    assert spent <= 4.0
    smaller = DistributedNoise(local_stddev=share * 0.99, **settings).epsilon(
        sites=4, sample_rate=0.5, steps=20, delta=1e-5
    )
    assert smaller > 4.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: ddg_tau(local_stddev=0.0, sites=2),
        lambda: ddg_tau(local_stddev=1.0, sites=0),
        lambda: rounded_l2_bound(l2_bound=1.0, beta=1.0, dim=4),
        lambda: ddg_rdp(l2_scale=1, l1_scale=1, tau=0, dim=1, sample_rate=0.0, steps=1),
        lambda: ddg_rdp(l2_scale=1, l1_scale=1, tau=0, dim=1, sample_rate=1, steps=1, orders=[1.5]),
        lambda: epsilon_from_rdp(rdp=np.zeros(3), orders=[2, 3, 4], delta=0.0),
        lambda: DistributedNoise(clip=1.0, scale=-1.0, beta=0.1, dim=4, local_stddev=1.0),
    ],
)
def test_bad_parameters_are_refused_with_a_privacy_error(call: object) -> None:
    assert callable(call)
    with pytest.raises(PrivacyError):
        call()


# --- the count coordinate and the Gaussian equivalent ------------------------------------------

OPACUS_ORDERS = [float(order) for order in RDPAccountant.DEFAULT_ALPHAS]
NOISES = {
    "large share": DistributedNoise(
        clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=60.0
    ),
    "with count": DistributedNoise(
        clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=60.0, count_weight=16
    ),
    "small share, tau large": DistributedNoise(
        clip=1.0, scale=8.0, beta=0.0, dim=64, local_stddev=0.5, count_weight=2
    ),
    "tau comparable": DistributedNoise(
        clip=1.0, scale=4.0, beta=0.1, dim=16, local_stddev=0.9, count_weight=1
    ),
}


def _first_prop14_bounds(noise: DistributedNoise, sites: int, order: float) -> float:
    """Prop. 14 per step at any order >= 1, computed here from its three bounds."""
    summed = math.sqrt(sites) * noise.local_stddev
    d = noise.coordinates
    l2 = noise.l2_sensitivity
    l2_scale = l2 / summed
    l1_scale = l2 * min(math.sqrt(d), l2) / summed
    tau = ddg_tau(local_stddev=noise.local_stddev, sites=sites)
    half = order / 2
    return min(
        half * l2_scale**2 + tau * d,
        half * (l2_scale**2 + 2 * l1_scale * tau + tau**2 * d),
        half * (l2_scale + math.sqrt(d) * tau) ** 2,
    )


def test_without_a_count_weight_the_numbers_are_the_same_bit_for_bit() -> None:
    settings = {"clip": 1.0, "scale": 64.0, "beta": math.exp(-0.5), "dim": 1 << 12}
    plain = DistributedNoise(local_stddev=60.0, **settings)
    zero = DistributedNoise(local_stddev=60.0, count_weight=0.0, **settings)
    assert plain.coordinates == plain.dim == 1 << 12
    assert plain.l2_sensitivity == rounded_l2_bound(l2_bound=64.0, beta=math.exp(-0.5), dim=4096)
    assert zero.l2_sensitivity == plain.l2_sensitivity
    assert (
        zero.rdp(sites=9, sample_rate=0.5, steps=3) == plain.rdp(sites=9, sample_rate=0.5, steps=3)
    ).all()
    # The value before the count existed.
    assert plain.l2_sensitivity == 72.22188034107116


def test_the_count_adds_an_exact_coordinate_in_quadrature() -> None:
    noise = NOISES["small share, tau large"]
    assert noise.coordinates == 65
    # beta 0: the rounded gradient's bound is 8 + sqrt(64) = 16; the count adds 2 exactly.
    assert noise.l2_sensitivity == pytest.approx(math.sqrt(16**2 + 2**2), rel=1e-15)
    with_count = NOISES["with count"]
    assert with_count.coordinates == (1 << 12) + 1
    assert with_count.l2_sensitivity == pytest.approx(
        math.sqrt(NOISES["large share"].l2_sensitivity ** 2 + 16**2), rel=1e-15
    )
    # Prop. 14 sees d + 1 coordinates: its tau d term grows by tau.
    tau = ddg_tau(local_stddev=0.5, sites=3)
    ours = noise.rdp(sites=3, sample_rate=1.0, steps=1, orders=[2])[0]
    assert ours == pytest.approx(_first_prop14_bounds(noise, 3, 2.0), rel=1e-12)
    assert ours == pytest.approx(260.0 / 0.75 + tau * 65, rel=1e-12)


@pytest.mark.parametrize("weight", [-1.0, 0.5, math.inf, math.nan, True])
def test_a_count_weight_that_is_not_a_whole_number_of_grid_units_is_refused(
    weight: float,
) -> None:
    with pytest.raises(PrivacyError, match="count_weight"):
        DistributedNoise(
            clip=1.0, scale=4.0, beta=0.1, dim=16, local_stddev=1.0, count_weight=weight
        )


def test_gaussian_equivalent_pins_the_first_bound_of_proposition_14() -> None:
    noise = NOISES["small share, tau large"]
    tau = ddg_tau(local_stddev=0.5, sites=3)
    assert tau == pytest.approx(1.2206373471865504, rel=1e-12)
    l2 = math.sqrt(260.0) / (math.sqrt(3) * 0.5)
    expected = 1 / math.sqrt(l2**2 + 2 * tau * 65)
    assert gaussian_equivalent(noise=noise, sites=3) == pytest.approx(expected, rel=1e-14)
    assert gaussian_equivalent(noise=noise, sites=3) == pytest.approx(
        0.044484024417361066, rel=1e-12
    )
    # One site: tau is 0 and the equivalent is the share over the sensitivity.
    assert gaussian_equivalent(noise=noise, sites=1) == pytest.approx(
        0.5 / math.sqrt(260.0), rel=1e-15
    )
    large = NOISES["with count"]
    assert gaussian_equivalent(noise=large, sites=9) == pytest.approx(
        3 * 60.0 / large.l2_sensitivity, rel=1e-15
    )
    with pytest.raises(PrivacyError):
        gaussian_equivalent(noise=noise, sites=0)


@pytest.mark.parametrize("name", sorted(NOISES))
@pytest.mark.parametrize("sites", [1, 2, 3, 10])
def test_the_gaussian_equivalent_dominates_the_ddg_at_every_order(name: str, sites: int) -> None:
    noise = NOISES[name]
    z = gaussian_equivalent(noise=noise, sites=sites)
    integer = list(range(2, 129))
    gaussian = np.asarray(
        opacus_rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=integer)
    )
    ddg = noise.rdp(sites=sites, sample_rate=1.0, steps=1, orders=integer)
    assert (gaussian >= ddg * (1 - 1e-12)).all()
    # Opacus' own grid, fractional orders in (1, 2) included, where ddg_rdp refuses to go:
    # there the three bounds of Prop. 14 are evaluated here.
    gaussian = np.asarray(
        opacus_rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=OPACUS_ORDERS)
    )
    for order, value in zip(OPACUS_ORDERS, gaussian, strict=True):
        if order.is_integer():
            bound = noise.rdp(sites=sites, sample_rate=1.0, steps=1, orders=[int(order)])[0]
            assert bound == pytest.approx(_first_prop14_bounds(noise, sites, order), rel=1e-12)
        else:
            bound = _first_prop14_bounds(noise, sites, order)
        assert value >= bound * (1 - 1e-12), (order, value, bound)


def test_the_factor_two_on_tau_is_what_covers_orders_below_two() -> None:
    noise = NOISES["small share, tau large"]
    tau, d = ddg_tau(local_stddev=0.5, sites=3), noise.coordinates
    l2 = noise.l2_sensitivity / (math.sqrt(3) * 0.5)
    z = gaussian_equivalent(noise=noise, sites=3)
    # At order 1 the Gaussian's curve meets Prop. 14's first bound: no order-wise slack left.
    assert 1 / (2 * z**2) == pytest.approx(l2**2 / 2 + tau * d, rel=1e-12)
    # With tau d instead of 2 tau d, orders just above 1 would be charged less than the DDG's.
    loose = 1 / math.sqrt(l2**2 + tau * d)
    assert 1.1 / (2 * loose**2) < _first_prop14_bounds(noise, 3, 1.1)


def test_the_equivalent_approaches_the_summed_share_over_the_sensitivity() -> None:
    ratios = []
    for stddev in (0.3, 0.5, 0.8, 1.2, 3.0):
        noise = DistributedNoise(
            clip=1.0, scale=4.0, beta=0.1, dim=16, local_stddev=stddev, count_weight=1
        )
        ideal = math.sqrt(5) * stddev / noise.l2_sensitivity
        ratios.append(gaussian_equivalent(noise=noise, sites=5) / ideal)
    assert all(a < b for a, b in itertools.pairwise(ratios))
    assert ratios[0] < 0.5
    assert ratios[-1] == pytest.approx(1.0, rel=1e-12)


def _plan(budget: str = "distributed") -> DistributedPlan:
    return DistributedPlan(noise=NOISES["with count"], sites=9, budget=budget)  # type: ignore[arg-type]


def test_a_plan_names_both_multipliers_and_enforces_the_one_its_budget_names() -> None:
    plan = _plan()
    assert plan.distributed_noise_multiplier == pytest.approx(2.4333213169614383, rel=1e-12)
    assert plan.local_noise_multiplier == pytest.approx(0.8111071056538127, rel=1e-12)
    assert plan.enforced_noise_multiplier == plan.distributed_noise_multiplier
    assert _plan("local").enforced_noise_multiplier == plan.local_noise_multiplier
    data = plan.to_json()
    assert data == {
        "sites": 9,
        "budget": "distributed",
        "clip": 1.0,
        "scale": 64.0,
        "beta": math.exp(-0.5),
        "dim": 4096,
        "count_weight": 16.0,
        "local_stddev": 60.0,
        "distributed_noise_multiplier": plan.distributed_noise_multiplier,
        "local_noise_multiplier": plan.local_noise_multiplier,
    }
    assert DistributedPlan.from_json(json.loads(json.dumps(data))) == plan


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sites": 0}, "sites"),
        ({"sites": True}, "sites"),
        ({"dim": 4096.0}, "dim"),
        ({"budget": "global"}, "budget"),
        ({"clip": "1"}, "clip"),
        ({"beta": 1.0}, "beta"),
        ({"local_stddev": 0.0}, "local_stddev"),
        ({"count_weight": 1.5}, "count_weight"),
        ({"local_noise_multiplier": -1.0}, "local_noise_multiplier"),
        ({"distributed_noise_multiplier": None}, "distributed_noise_multiplier"),
        ({"extra": 1}, "unknown fields extra"),
        ({"scale": ...}, "missing fields scale"),
    ],
)
def test_reading_a_plan_back_names_the_bad_field(change: dict[str, object], named: str) -> None:
    data = {**_plan().to_json(), **change}
    data = {key: value for key, value in data.items() if value is not ...}
    with pytest.raises(PrivacyError) as caught:
        DistributedPlan.from_json(data)
    assert named in caught.value.message
    with pytest.raises(PrivacyError, match="JSON object"):
        DistributedPlan.from_json([1, 2])
