"""Fixed-point encoding modulo 2^32: the no-wrap bound at its edge, the layout, the error bound."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.errors import ConfigError, SecureAggregationError
from medfed.secagg import FixedPoint, choose_scale, decode_weighted_sum, encode_weighted
from medfed.secagg.encoding import LIMIT

# 8 sites, weight 1, scale 2^20: the largest code is floor((2^31 - 1) / 8) = 268435455, so the
# largest bound is 268435455 / 2^20, a float64 exactly.
EDGE_SITES, EDGE_SCALE = 8, 2.0**20
EDGE_B = 268435455 / EDGE_SCALE


def _sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    return total


def test_at_the_edge_of_the_bound_the_extreme_sum_is_exact() -> None:
    point = FixedPoint(scale=EDGE_SCALE, sites=EDGE_SITES, max_weight=1, max_abs=EDGE_B)
    for sign in (1.0, -1.0):
        update = np.full(3, sign * EDGE_B)
        vectors = [encode_weighted(point=point, weight=1, update=update) for _ in range(8)]
        total = _sum(vectors)
        assert int(total.view(np.int32)[1]) == int(sign) * 8 * 268435455
        assert abs(int(total.view(np.int32)[1])) <= LIMIT
        decoded = decode_weighted_sum(point=point, total=total, sites=8)
        assert decoded.weight == 8
        np.testing.assert_array_equal(decoded.update, np.full(3, sign * 8 * EDGE_B))


def test_one_step_beyond_the_bound_is_refused() -> None:
    beyond = EDGE_B + 1 / EDGE_SCALE
    with pytest.raises(ConfigError, match="2147483648 exceeds 2\\^31 - 1"):
        FixedPoint(scale=EDGE_SCALE, sites=EDGE_SITES, max_weight=1, max_abs=beyond)
    with pytest.raises(ConfigError, match="could wrap"):
        FixedPoint(scale=EDGE_SCALE, sites=EDGE_SITES + 1, max_weight=1, max_abs=EDGE_B)
    # Without the bound the same extreme inputs would wrap to the opposite sign.
    codes = np.full(8, 268435456, dtype=np.uint32)
    assert int(_sum(list(codes.reshape(8, 1))).view(np.int32)[0]) == -(2**31)


def test_choose_scale_picks_the_largest_power_of_two_that_fits() -> None:
    point = choose_scale(sites=10, max_weight=1000, max_abs=1.0, max_error=1e-3)
    assert point.scale == 2.0**17
    assert 10 * 1000 * 2**17 <= LIMIT < 10 * 1000 * 2**18
    with pytest.raises(ConfigError):
        FixedPoint(scale=2.0**18, sites=10, max_weight=1000, max_abs=1.0)
    assert point.max_sum_error == 10 / 2**18


@pytest.mark.parametrize(
    ("sites", "max_weight", "max_abs"), [(3, 500, 0.05), (5, 1, 7.5), (40, 20000, 2.0)]
)
def test_chosen_scales_sit_at_the_edge(sites: int, max_weight: int, max_abs: float) -> None:
    point = choose_scale(sites=sites, max_weight=max_weight, max_abs=max_abs, max_error=1.0)
    assert sites * round(max_weight * max_abs * point.scale) <= LIMIT
    assert sites * round(max_weight * max_abs * point.scale * 2) > LIMIT


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sites": 1}, "at least 2 sites"),
        ({"max_weight": 0}, "max_weight of at least 1"),
        ({"max_abs": float("nan")}, "max_abs"),
        ({"max_abs": 0.0}, "max_abs"),
        ({"sites": 3, "max_weight": 2**30}, "exceeds 2\\^31 - 1"),
        ({"max_error": 0.0}, "max_error"),
        ({"max_abs": 1e6, "max_error": 1e-3}, "above max_error"),
    ],
)
def test_parameters_that_cannot_fit_are_refused(arguments: dict[str, float], message: str) -> None:
    settings = {"sites": 10, "max_weight": 1000, "max_abs": 1.0, "max_error": 1e-2} | arguments
    with pytest.raises(ConfigError, match=message) as caught:
        choose_scale(**settings)  # type: ignore[arg-type]
    assert caught.value.hint


def test_the_layout_carries_weight_weighted_update_and_extras() -> None:
    point = choose_scale(sites=3, max_weight=100, max_abs=2.0, max_error=1e-4)
    update = np.array([0.5, -1.25, 2.0, 0.0], dtype=np.float32)
    encoded = encode_weighted(point=point, weight=7, update=update, extras=(0.75, 1.5))
    assert encoded.dtype == np.uint32 and encoded.shape == (7,)
    assert int(encoded[0]) == 7
    signed = encoded.view(np.int32)
    assert int(signed[2]) == round(7 * -1.25 * point.scale)
    decoded = decode_weighted_sum(point=point, total=encoded, sites=1, extras=2)
    assert decoded.weight == 7
    np.testing.assert_array_equal(decoded.update, 7 * update.astype(np.float64))
    assert decoded.extras == (7 * 0.75, 7 * 1.5)
    np.testing.assert_array_equal(decoded.mean(), update)


def test_decoded_sum_is_within_the_stated_error_of_the_float_sum() -> None:
    sites, max_weight, bound = 5, 300, 0.1
    point = choose_scale(sites=sites, max_weight=max_weight, max_abs=bound, max_error=1e-3)
    rng = np.random.default_rng(3)
    weights = [int(w) for w in rng.integers(1, max_weight + 1, size=sites)]
    updates = [rng.uniform(-bound, bound, size=5000).astype(np.float32) for _ in range(sites)]
    total = _sum(
        [
            encode_weighted(point=point, weight=c, update=u)
            for c, u in zip(weights, updates, strict=True)
        ]
    )
    decoded = decode_weighted_sum(point=point, total=total, sites=sites)
    exact = sum(c * u.astype(np.float64) for c, u in zip(weights, updates, strict=True))
    error = np.max(np.abs(decoded.update - exact))
    assert decoded.weight == sum(weights)
    assert error <= point.max_sum_error == sites / (2 * point.scale)
    assert error > point.max_sum_error / 100  # rounding does happen: the bound is not vacuous


@pytest.mark.parametrize(
    ("weight", "update", "message"),
    [
        (101, [0.0], "outside 0..100"),
        (-1, [0.0], "outside 0..100"),
        (True, [0.0], "not an integer"),
        (3, [2.5], "leave the bound"),
        (3, [float("nan")], "not finite"),
        (3, [float("inf")], "leave the bound"),
    ],
)
def test_inputs_beyond_the_bound_are_refused_not_wrapped(
    weight: int, update: list[float], message: str
) -> None:
    point = choose_scale(sites=3, max_weight=100, max_abs=2.0, max_error=1e-2)
    with pytest.raises(SecureAggregationError, match=message) as caught:
        encode_weighted(point=point, weight=weight, update=np.array(update))
    assert caught.value.one_line().startswith("error[secure-aggregation]")


def test_a_sum_that_left_the_encoded_range_is_refused() -> None:
    point = choose_scale(sites=3, max_weight=100, max_abs=2.0, max_error=1e-2)
    encoded = encode_weighted(point=point, weight=100, update=np.full(4, 2.0))
    with pytest.raises(SecureAggregationError, match="range"):
        decode_weighted_sum(point=point, total=encoded * np.uint32(2), sites=1)
    with pytest.raises(SecureAggregationError, match=r"allows 1\.\.3"):
        decode_weighted_sum(point=point, total=encoded, sites=4)
    with pytest.raises(SecureAggregationError, match="does not hold a weight"):
        decode_weighted_sum(point=point, total=encoded.astype(np.int64), sites=1)
