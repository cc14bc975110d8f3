"""The distributed discrete Gaussian's accounting against Opacus' Gaussian RDP and the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp

from medfed.errors import PrivacyError
from medfed.privacy.distributed_noise import (
    DEFAULT_ORDERS,
    DistributedNoise,
    ddg_rdp,
    ddg_tau,
    epsilon_from_rdp,
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
