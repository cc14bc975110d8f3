"""The integer grid of a distributed-noise round: both sides derive it, and the sum decodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfed.errors import SecureAggregationError
from medfed.secagg.discrete_noise import discrete_gaussian, patient_vector
from medfed.secagg.grid import (
    GRID_NORM,
    HALF_RANGE,
    decode,
    from_words,
    grid_for,
    rotation_seed,
    to_words,
    wrap_problem,
)


def test_the_grid_follows_from_public_values_alone() -> None:
    grid = grid_for(dim=5_527, clip=0.5, count_share=0.25, run_id="run", round_id=3)
    again = grid_for(dim=5_527, clip=0.5, count_share=0.25, run_id="run", round_id=3)
    assert grid == again
    assert grid.padded == 8_192 and grid.length == 8_193
    assert grid.scale == pytest.approx(GRID_NORM * math.sqrt(8_192) / 0.5)
    # Rounding inflates one patient's bound by well under 1% at this grid.
    assert grid.clip * grid.scale < grid.l2_bound < 1.01 * grid.clip * grid.scale
    assert grid.count_weight == round(0.25 * grid.l2_bound)
    assert rotation_seed(run_id="run", round_id=4) != grid.rotation_seed
    assert rotation_seed(run_id="other", round_id=3) != grid.rotation_seed


@pytest.mark.parametrize(("clip", "share"), [(0.0, 0.25), (math.inf, 0.25), (1.0, 0.0), (1.0, 2.0)])
def test_bad_grid_settings_are_refused(clip: float, share: float) -> None:
    with pytest.raises(SecureAggregationError):
        grid_for(dim=10, clip=clip, count_share=share, run_id="r", round_id=1)


def test_words_carry_signed_integers_modulo_two_to_the_32() -> None:
    values = np.array([-HALF_RANGE, -1, 0, 1, HALF_RANGE - 1], dtype=np.int64)
    assert np.array_equal(from_words(to_words(values)), values)
    summed = to_words(np.array([-5])) + to_words(np.array([3]))  # uint32 addition wraps
    assert from_words(summed).tolist() == [-2]


def _site_vector(
    gradients: np.ndarray, grid: object, *, noise: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One site's integer vector (clipped patients on the grid, the count, optional noise)."""
    from medfed.secagg.grid import Grid

    assert isinstance(grid, Grid)
    total = np.zeros(grid.padded, dtype=np.int64)
    clipped = []
    for row in gradients:
        row = row * min(1.0, grid.clip / (np.linalg.norm(row) + 1e-6))
        clipped.append(row)
        total += patient_vector(
            row, seed=grid.rotation_seed, scale=grid.scale, l2_bound=grid.l2_bound
        )
    vector = np.concatenate([total, [len(gradients) * grid.count_weight]])
    if noise is not None:
        vector += discrete_gaussian(sigma=noise, count=vector.size)
    return to_words(vector), np.sum(clipped, axis=0)


def test_three_sites_words_add_up_to_the_clipped_gradient_sum_and_the_count() -> None:
    rng = np.random.default_rng(0)
    dim = 300
    grid = grid_for(dim=dim, clip=1.0, count_share=0.25, run_id="r", round_id=1)
    words = np.zeros(grid.length, dtype=np.uint32)
    exact = np.zeros(dim)
    patients = 0
    for site in range(3):
        gradients = rng.normal(size=(5 + site, dim)) * (0.01 if site == 0 else 1.0)
        site_words, clipped = _site_vector(gradients, grid)
        words += site_words
        exact += clipped
        patients += len(gradients)
    noisy = decode(grid=grid, words=words)
    assert noisy.patients == patients  # no noise: the count is exact
    # Each patient's rounding moves its vector by at most sqrt(padded) grid units (L2).
    bound = patients * math.sqrt(grid.padded) / grid.scale
    assert np.linalg.norm(noisy.gradient - exact) <= bound
    assert np.linalg.norm(noisy.gradient - exact) < 0.05 * np.linalg.norm(exact)


def test_noise_shares_add_up_in_the_sum_and_decode_to_the_clip_scale() -> None:
    grid = grid_for(dim=256, clip=1.0, count_share=0.5, run_id="r", round_id=2)
    sigma = 3.0 * grid.l2_bound  # each of four sites' share
    zero = np.zeros((1, 256))
    words = sum(
        (_site_vector(zero, grid, noise=sigma)[0] for _ in range(4)),
        start=np.zeros(grid.length, dtype=np.uint32),
    )
    noisy = decode(grid=grid, words=words)
    # The summed noise has standard deviation 2 sigma per coordinate in grid units.
    spread = float(np.std(noisy.gradient)) * grid.scale
    assert 1.6 * sigma < spread < 2.4 * sigma
    assert abs(noisy.patients - 4) < 10 * 2 * sigma / grid.count_weight


def test_a_sum_of_another_length_is_refused() -> None:
    grid = grid_for(dim=10, clip=1.0, count_share=0.25, run_id="r", round_id=1)
    with pytest.raises(SecureAggregationError, match="words for a grid"):
        decode(grid=grid, words=np.zeros(grid.length + 1, dtype=np.uint32))


def test_the_wrap_check_names_what_could_overflow() -> None:
    grid = grid_for(dim=5_527, clip=0.5, count_share=0.25, run_id="r", round_id=1)
    assert wrap_problem(grid=grid, patients=30_000, noise_std=1e5) is None
    problem = wrap_problem(grid=grid, patients=10**8, noise_std=1e5)
    assert problem is not None and "beyond 2^31" in problem
