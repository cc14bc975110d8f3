"""Aggregation strategies against values worked out by hand on tiny arrays."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest
from pydantic import ValidationError

from medfed.aggregator import aggregate
from medfed.aggregator.strategies import (
    FedAdam,
    FedAdamState,
    coordinate_median,
    fedavg,
    fedprox,
    trimmed_count,
    trimmed_mean,
)
from medfed.config.strategy import StrategySettings
from medfed.errors import AggregationError, ConfigError
from medfed.types import SiteUpdate


def update(site: str, num_patients: int = 1, **weights: list[float]) -> SiteUpdate:
    arrays = {name: np.array(values, dtype=np.float32) for name, values in weights.items()}
    return SiteUpdate(site_id=site, round=1, weights=arrays, num_patients=num_patients)


def scalar_updates(values: list[float]) -> list[SiteUpdate]:
    return [update(f"s{i}", w=[v]) for i, v in enumerate(values)]


GLOBAL = {"w": np.array([1.0, 2.0], dtype=np.float32)}


# --- FedAvg / FedProx ---------------------------------------------------------------------------


def test_fedavg_weights_by_patients() -> None:
    result = fedavg(updates=[update("a", 1, w=[1.0, 2.0]), update("b", 3, w=[3.0, 4.0])])
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], np.array([2.5, 3.5], dtype=np.float32))


def test_fedavg_averages_every_array() -> None:
    result = fedavg(updates=[update("a", 1, w=[0.0], b=[2.0]), update("b", 1, w=[4.0], b=[6.0])])
    assert set(result) == {"w", "b"}
    np.testing.assert_array_equal(result["b"], [4.0])
    np.testing.assert_array_equal(result["w"], [2.0])


def test_fedavg_of_values_far_apart() -> None:
    # (1 + 2**24) / 2 = 8388608.5 lies halfway between two float32 values and rounds to
    # 8388608 (ties to even) whatever dtype accumulates; test_aggregator_accumulate.py bounds
    # the error of the float32 running sum itself.
    result = fedavg(updates=[update("a", w=[1.0]), update("b", w=[2.0**24])])
    assert result["w"][0] == np.float32(8388608.5)


def test_fedavg_refuses_zero_patients() -> None:
    with pytest.raises(AggregationError, match="site 'b' reports 0 patients"):
        fedavg(updates=[update("a", 1, w=[1.0]), update("b", 0, w=[1.0])])


def test_fedprox_server_step_is_fedavg() -> None:
    updates = [update("a", 2, w=[1.0, 5.0]), update("b", 6, w=[3.0, -1.0])]
    np.testing.assert_array_equal(fedprox(updates=updates)["w"], fedavg(updates=updates)["w"])


def test_fedprox_settings_carry_mu_to_sites() -> None:
    settings = StrategySettings(name="fedprox", proximal_mu=0.01)
    assert settings.site_settings() == {"proximal_mu": 0.01}
    assert StrategySettings(name="fedavg").site_settings() == {}


@pytest.mark.parametrize(
    "raw",
    [
        {"name": "fedprox"},  # mu 0 is fedavg in disguise
        {"name": "fedavg", "proximal_mu": 0.1},  # sites would apply it silently
        {"name": "krum"},
        {"name": "fedavg", "server_lr_typo": 1.0},
        {"name": "fedadam", "beta1": 1.0},
        {"name": "fedadam", "tau": 0.0},
        {"name": "trimmed_mean", "trim_fraction": 0.5},
        {"name": "fedavg", "server_lr_schedule": "cosine"},  # fedavg has no server rate
        {"name": "fedadam", "server_lr_schedule": "step"},
        {"name": "fedadam", "server_lr_schedule": "cosine", "server_lr_final": 0.0},
        {"name": "fedadam", "server_lr_schedule": "cosine", "server_lr_final": 1.5},
    ],
)
def test_bad_settings_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StrategySettings.model_validate(raw)


# --- FedAdam ------------------------------------------------------------------------------------


def test_fedadam_first_step_by_hand() -> None:
    # avg = [0.5, 2.5]; g = x - avg = [0.5, -0.5]; m = 0.1 g = [0.05, -0.05];
    # v = 0.01 g^2 = [0.0025, 0.0025]; step = 0.1 * 0.05 / (0.05 + 0.01) = 1/12.
    opt = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    updates = [update("a", 1, w=[0.0, 3.0]), update("b", 1, w=[1.0, 2.0])]
    weights, state = opt.step(state=None, global_weights=GLOBAL, updates=updates)
    assert weights["w"].dtype == np.float32
    np.testing.assert_allclose(weights["w"], [11 / 12, 25 / 12], rtol=1e-6)
    assert state.step == 1
    np.testing.assert_allclose(state.m["w"], [0.05, -0.05], rtol=1e-12)
    np.testing.assert_allclose(state.v["w"], [0.0025, 0.0025], rtol=1e-12)

    # Second step from the new global model: g = 11/12 - 0.5 = 5/12 on the first coordinate.
    weights2, state2 = opt.step(state=state, global_weights=weights, updates=updates)
    g = 5 / 12
    m = 0.9 * 0.05 + 0.1 * g
    v = 0.99 * 0.0025 + 0.01 * g * g
    assert state2.step == 2
    np.testing.assert_allclose(state2.m["w"][0], m, rtol=1e-6)
    np.testing.assert_allclose(state2.v["w"][0], v, rtol=1e-6)
    np.testing.assert_allclose(weights2["w"][0], 11 / 12 - 0.1 * m / (v**0.5 + 0.01), rtol=1e-6)
    # The earlier state is a value: stepping did not change it.
    assert state.step == 1
    np.testing.assert_allclose(state.m["w"], [0.05, -0.05], rtol=1e-12)


def test_cosine_server_rate_by_hand() -> None:
    # eta_t = eta * (f + (1 - f) * (1 + cos(pi * (t - 1) / (T - 1))) / 2), f = 0.1, T = 5
    settings = StrategySettings(
        name="fedadam", server_lr=0.05, server_lr_schedule="cosine", server_lr_final=0.1
    )
    rates = [settings.server_lr_at(round=t, rounds=5) for t in range(1, 6)]
    expected = [0.05, 0.05 * (0.1 + 0.9 * (1 + 0.5**0.5) / 2), 0.0275, None, 0.005]
    expected[3] = 0.05 * (0.1 + 0.9 * (1 - 0.5**0.5) / 2)
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    # rounds past the planned end (a run extended) stay at the final rate
    assert settings.server_lr_at(round=9, rounds=5) == pytest.approx(0.005)
    constant = StrategySettings(name="fedadam", server_lr=0.05)
    assert {constant.server_lr_at(round=t, rounds=5) for t in range(1, 6)} == {0.05}


def test_a_scheduled_round_steps_at_its_rate() -> None:
    settings = StrategySettings(
        name="fedadam", server_lr=0.1, server_lr_schedule="cosine", server_lr_final=0.2
    )
    updates = [update("a", 1, w=[0.0, 3.0]), update("b", 1, w=[1.0, 2.0])]
    first = aggregate(settings=settings, state=None, global_weights=GLOBAL, updates=updates)
    last = aggregate(
        settings=settings, state=None, global_weights=GLOBAL, updates=updates, round=4, rounds=4
    )
    # the hand-worked step of test_fedadam_first_step_by_hand (tau 1e-3 here): 0.1 * 0.05 /
    # (0.05 + 0.001) at round 1, a fifth of it at the last round
    step = 0.1 * 0.05 / (0.05 + 1e-3)
    np.testing.assert_allclose(first.weights["w"], [1 - step, 2 + step], rtol=1e-6)
    np.testing.assert_allclose(last.weights["w"], [1 - step / 5, 2 + step / 5], rtol=1e-6)


def test_fedadam_no_change_when_sites_agree_with_global() -> None:
    same = [update("a", 3, w=[1.0, 2.0]), update("b", 1, w=[1.0, 2.0])]
    weights, state = FedAdam().step(state=None, global_weights=GLOBAL, updates=same)
    np.testing.assert_array_equal(weights["w"], GLOBAL["w"])
    assert state.step == 1


def test_fedadam_refuses_bad_hyperparameters() -> None:
    with pytest.raises(ConfigError):
        FedAdam(eta=0.0)


def test_fedadam_state_round_trips_through_plain_arrays() -> None:
    updates = [update("a", 1, w=[0.0, 3.0])]
    _, state = FedAdam().step(state=None, global_weights=GLOBAL, updates=updates)
    arrays = state.to_arrays()
    assert set(arrays) == {"step", "m/w", "v/w"}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    restored = FedAdamState.from_arrays(arrays)
    assert restored.step == state.step
    np.testing.assert_array_equal(restored.m["w"], state.m["w"])
    np.testing.assert_array_equal(restored.v["w"], state.v["w"])


@pytest.mark.parametrize(
    "arrays",
    [
        {"m/w": np.zeros(2), "v/w": np.zeros(2)},  # no step
        {"step": np.array([1]), "m/w": np.zeros(2)},  # m without v
        {"step": np.array([1]), "m/w": np.zeros(2), "v/w": np.zeros(3)},
        {"step": np.array([1]), "m/w": np.zeros(2), "v/w": np.zeros(2), "x": np.zeros(1)},
    ],
)
def test_fedadam_state_from_bad_arrays_refused(arrays: Mapping[str, np.ndarray]) -> None:
    with pytest.raises(AggregationError):
        FedAdamState.from_arrays(arrays)


def test_fedadam_state_must_match_model() -> None:
    state = FedAdamState.initial(global_weights={"other": np.zeros(2, dtype=np.float32)})
    with pytest.raises(AggregationError, match="state does not match"):
        FedAdam().step(state=state, global_weights=GLOBAL, updates=[update("a", w=[1.0, 1.0])])


# --- Robust strategies --------------------------------------------------------------------------


def test_median_ignores_an_outlier() -> None:
    clean = coordinate_median(updates=scalar_updates([1.0, 2.0, 3.0, 4.0, 5.0]))
    attacked = coordinate_median(updates=scalar_updates([1.0, 2.0, 3.0, 4.0, 1e9]))
    np.testing.assert_array_equal(clean["w"], [3.0])
    np.testing.assert_array_equal(attacked["w"], [3.0])
    assert attacked["w"].dtype == np.float32


def test_median_is_unweighted_and_per_coordinate() -> None:
    updates = [update("a", 100, w=[0.0, 9.0]), update("b", 1, w=[1.0, 7.0])]
    updates.append(update("c", 1, w=[2.0, 8.0]))
    np.testing.assert_array_equal(coordinate_median(updates=updates)["w"], [1.0, 8.0])


def test_trimmed_mean_ignores_outliers_at_both_ends() -> None:
    # n = 5, trim 0.2 -> k = 1: the mean of the middle three values, 2, 3, 4.
    high = trimmed_mean(updates=scalar_updates([1.0, 2.0, 3.0, 4.0, 1e9]), trim_fraction=0.2)
    low = trimmed_mean(updates=scalar_updates([-1e9, 2.0, 3.0, 4.0, 5.0]), trim_fraction=0.2)
    np.testing.assert_array_equal(high["w"], [3.0])
    # Low side: -1e9 and 5 are dropped, leaving 2, 3, 4 again.
    np.testing.assert_array_equal(low["w"], [3.0])
    assert high["w"].dtype == np.float32


def test_trimmed_mean_with_zero_trim_is_the_plain_mean() -> None:
    result = trimmed_mean(updates=scalar_updates([1.0, 2.0, 6.0]), trim_fraction=0.0)
    np.testing.assert_array_equal(result["w"], [3.0])


@pytest.mark.parametrize(
    ("fraction", "n", "k"), [(0.2, 5, 1), (0.2, 4, 0), (0.49, 3, 1), (0.29, 100, 29), (0.1, 10, 1)]
)
def test_trimmed_count_is_floor_of_fraction_times_n(fraction: float, n: int, k: int) -> None:
    assert trimmed_count(trim_fraction=fraction, num_updates=n) == k


@pytest.mark.parametrize("fraction", [0.5, 0.7, -0.1])
def test_trimmed_mean_refuses_fraction_that_leaves_nothing(fraction: float) -> None:
    with pytest.raises(ConfigError, match="trim_fraction"):
        trimmed_mean(updates=scalar_updates([1.0, 2.0]), trim_fraction=fraction)


# --- Common refusals and dispatch ---------------------------------------------------------------

ALL = ["fedavg", "fedprox", "fedadam", "median", "trimmed_mean"]


def settings_for(name: str) -> StrategySettings:
    return StrategySettings.model_validate(
        {"name": name, "proximal_mu": 0.01 if name == "fedprox" else 0.0}
    )


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_refuses_an_empty_round(name: str) -> None:
    with pytest.raises(AggregationError, match="no site updates"):
        aggregate(settings=settings_for(name), state=None, global_weights=GLOBAL, updates=[])


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_refuses_mismatched_shapes(name: str) -> None:
    updates = [update("a", w=[1.0, 2.0]), update("b", w=[1.0, 2.0, 3.0])]
    with pytest.raises(AggregationError, match=r"site 'b'.*'w'"):
        aggregate(settings=settings_for(name), state=None, global_weights=GLOBAL, updates=updates)


@pytest.mark.parametrize(
    "function",
    [
        fedavg,
        fedprox,
        coordinate_median,
        lambda updates: trimmed_mean(updates=updates, trim_fraction=0.1),
    ],
)
def test_functions_refuse_empty_and_mismatched_keys(function: Callable[..., object]) -> None:
    with pytest.raises(AggregationError):
        function(updates=[])
    with pytest.raises(AggregationError, match="site 'b'"):
        function(updates=[update("a", w=[1.0]), update("b", v=[1.0])])


@pytest.mark.parametrize("name", ALL)
def test_aggregate_dispatches_and_returns_float32(name: str) -> None:
    updates = [update("a", 1, w=[0.0, 3.0]), update("b", 3, w=[1.0, 2.0])]
    updates.append(update("c", 1, w=[5.0, -4.0]))
    result = aggregate(
        settings=settings_for(name), state=None, global_weights=GLOBAL, updates=updates
    )
    assert set(result.weights) == {"w"}
    assert result.weights["w"].dtype == np.float32
    expected = {
        "fedavg": [1.6, 1.0],
        "fedprox": [1.6, 1.0],
        "median": [1.0, 2.0],
        "trimmed_mean": [2.0, 1.0 / 3.0],  # 0.1 * 3 -> k = 0: the plain mean
    }
    if name == "fedadam":
        assert result.state is not None and result.state.step == 1
    else:
        assert result.state is None
        np.testing.assert_allclose(result.weights["w"], expected[name], rtol=1e-6)


def test_aggregate_refuses_updates_not_matching_global_model() -> None:
    updates = [update("a", w=[1.0, 2.0], extra=[0.0])]
    with pytest.raises(AggregationError, match="'extra'"):
        aggregate(settings=StrategySettings(), state=None, global_weights=GLOBAL, updates=updates)


def _fedadam_by_whole_arrays(
    opt: FedAdam,
    state: FedAdamState,
    global_weights: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The class docstring's formulas, each over whole arrays in float64."""
    weights, m, v = {}, {}, {}
    for name, x in global_weights.items():
        g = x.astype(np.float64) - average[name].astype(np.float64)
        m[name] = opt.beta1 * state.m[name] + (1.0 - opt.beta1) * g
        v[name] = opt.beta2 * state.v[name] + ((1.0 - opt.beta2) * g) * g
        step = (m[name] * opt.eta) / (np.sqrt(v[name]) + opt.tau)
        weights[name] = (x.astype(np.float64) - step).astype(np.float32)
    return weights, m, v


def test_fedadam_in_chunks_equals_the_whole_array_formulas_to_the_bit() -> None:
    from medfed.aggregator.strategies import ADAM_CHUNK

    rng = np.random.default_rng(5)
    shapes = {"big": (3, ADAM_CHUNK // 2 + 11), "odd": (7,), "exact": (ADAM_CHUNK,)}
    global_weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    opt = FedAdam(eta=0.05, beta1=0.8, beta2=0.95, tau=1e-3)
    state = FedAdamState.initial(global_weights=global_weights)
    for _ in range(3):
        average = {
            n: (w + 0.1 * rng.standard_normal(w.shape)).astype(np.float32)
            for n, w in global_weights.items()
        }
        weights, new_state = opt.step_to(
            state=state, global_weights=global_weights, average=average
        )
        expected, m, v = _fedadam_by_whole_arrays(opt, state, global_weights, average)
        for name, shape in shapes.items():
            assert weights[name].dtype == np.float32 and weights[name].shape == shape
            assert weights[name].tobytes() == expected[name].tobytes()
            assert new_state.m[name].tobytes() == m[name].tobytes()
            assert new_state.v[name].tobytes() == v[name].tobytes()
        global_weights, state = weights, new_state
    assert state.step == 3
