"""The site's share of the distributed discrete Gaussian: the sampler's law, rounding, rotation."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import stats

from medfed.errors import PrivacyError
from medfed.secagg.discrete_noise import (
    conditional_round,
    decode_sum,
    discrete_gaussian,
    padded_dim,
    patient_vector,
    rotate,
    unrotate,
)


@pytest.mark.parametrize("sigma", [0.8, 3.0])
def test_draws_follow_the_discrete_gaussian_law(sigma: float) -> None:
    draws = discrete_gaussian(sigma=sigma, count=200_000)
    assert draws.dtype == np.int64 and draws.size == 200_000
    support = np.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    expected = weights / weights.sum() * draws.size
    observed = np.array([(draws == x).sum() for x in support])
    keep = expected >= 5
    observed, expected = observed[keep], expected[keep]
    expected *= observed.sum() / expected.sum()
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-4
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)


def test_a_sum_of_shares_carries_the_summed_variance() -> None:
    shares = [discrete_gaussian(sigma=4.0, count=100_000) for _ in range(9)]
    assert np.sum(shares, axis=0).var() == pytest.approx(9 * 16.0, rel=0.03)


def test_rotation_keeps_the_norm_and_is_undone_exactly() -> None:
    seed = os.urandom(32)
    vector = np.random.default_rng(1).normal(size=1000)
    vector[3] = 50.0  # one large coordinate is spread over all of them
    rotated = rotate(vector, seed=seed)
    assert rotated.size == padded_dim(1000) == 1024
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(vector), rel=1e-12)
    assert np.abs(rotated).max() < 10.0
    np.testing.assert_allclose(unrotate(rotated, seed=seed, dim=1000), vector, atol=1e-10)
    assert not np.allclose(rotate(vector, seed=os.urandom(32)), rotated)


def test_conditional_rounding_is_unbiased_and_stays_within_its_bound() -> None:
    scaled = np.full(256, 0.25)
    bound = math.sqrt(256 * 0.25 + 3 * math.sqrt(256 * 0.25 * 0.75))
    rounds = np.stack([conditional_round(scaled, bound=bound) for _ in range(400)])
    assert set(np.unique(rounds)) <= {0, 1}
    assert (np.sqrt((rounds.astype(float) ** 2).sum(axis=1)) <= bound).all()
    assert rounds.mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(PrivacyError, match="L2 bound"):
        conditional_round(np.full(16, 0.5), bound=0.5)


def test_three_sites_sum_decodes_to_the_true_sum_within_the_noise() -> None:
    seed, dim, scale, sigma = os.urandom(32), 300, 256.0, 2.0
    rng = np.random.default_rng(7)
    patients = [rng.normal(size=dim) * 0.05 for _ in range(3 * 4)]
    bound = 1.0 * scale + math.sqrt(padded_dim(dim))
    sites = []
    for site in range(3):
        vectors = [
            patient_vector(g, seed=seed, scale=scale, l2_bound=bound)
            for g in patients[4 * site : 4 * site + 4]
        ]
        sites.append(
            np.sum(vectors, axis=0) + discrete_gaussian(sigma=sigma, count=padded_dim(dim))
        )
    decoded = decode_sum(np.sum(sites, axis=0), seed=seed, scale=scale, dim=dim)
    error = decoded - np.sum(patients, axis=0)
    # Rounding adds variance <= 1/4 per coordinate per patient, noise 3 sigma^2, both / scale^2.
    assert error.std() < math.sqrt(12 * 0.25 + 3 * sigma**2) / scale * 1.2
    assert abs(error.mean()) < 5 * error.std() / math.sqrt(dim)
