"""The streaming weighted sum and the round aggregation built on it, on real arrays."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import weakref
from collections.abc import Mapping

import numpy as np
import pytest
import threadpoolctl

from medfed.aggregator import accumulate
from medfed.aggregator.accumulate import WeightedSum
from medfed.aggregator.strategies import RoundAggregation, aggregate, fedavg
from medfed.config.strategy import StrategySettings
from medfed.errors import AggregationError
from medfed.types import SiteUpdate

# Large enough for BLAS to take its vectorised (and, unlimited, its threaded) path, with odd
# sizes that leave remainders at the end of every array.
LAYOUT = {"conv.weight": (3, (1 << 15) + 17), "conv.bias": (5,), "head": (2, 2, 2)}
MODEL_BYTES = sum(4 * int(np.prod(shape)) for shape in LAYOUT.values())


def make_updates(count: int, *, seed: int = 0) -> list[SiteUpdate]:
    """Updates near a common model, as sites send them, with different patient counts."""
    rng = np.random.default_rng(seed)
    base = {name: rng.standard_normal(shape) for name, shape in LAYOUT.items()}
    return [
        SiteUpdate(
            site_id=f"s{i}",
            round=1,
            weights={
                name: (values + 0.05 * rng.standard_normal(values.shape)).astype(np.float32)
                for name, values in base.items()
            },
            num_patients=int(rng.integers(5, 400)),
        )
        for i in range(count)
    ]


def weighted_average(updates: list[SiteUpdate], name: str, *, absolute: bool) -> np.ndarray:
    """The weighted mean (of magnitudes, with ``absolute``) of one array, in float64."""
    total = np.zeros(LAYOUT[name], dtype=np.float64)
    for update in updates:
        values = update.weights[name].astype(np.float64)
        total += update.num_patients * (np.abs(values) if absolute else values)
    return total / sum(update.num_patients for update in updates)


def streamed(updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    total = WeightedSum(layout=LAYOUT)
    for update in updates:
        total.add(update=update, weight=update.num_patients)
    return total.result()


def assert_within_float32_sum_bound(
    result: Mapping[str, np.ndarray], updates: list[SiteUpdate]
) -> None:
    """Each coordinate within (n + 2) float32 units of the weighted mean of magnitudes.

    n roundings of products and sums, one of the division and one of the final value: the
    error bound of float32 accumulation that accumulate.py's docstring gives.
    """
    for name in LAYOUT:
        reference = weighted_average(updates, name, absolute=False)
        bound = (len(updates) + 2) * 2.0**-24 * weighted_average(updates, name, absolute=True)
        error = np.abs(result[name].astype(np.float64) - reference)
        assert result[name].dtype == np.float32
        assert result[name].shape == LAYOUT[name]
        assert np.all(error <= bound), f"{name}: worst {np.max(error / bound):.2f} of the bound"


def test_streamed_sum_matches_the_float64_definition() -> None:
    updates = make_updates(10)
    assert_within_float32_sum_bound(streamed(updates), updates)


def test_streamed_round_equals_the_list_functions() -> None:
    updates = make_updates(7, seed=3)
    aggregation = RoundAggregation(
        settings=StrategySettings(name="fedavg"), global_weights=updates[0].weights
    )
    for update in updates:
        aggregation.add(update=update)
    result = aggregation.finish(state=None).weights
    listed = fedavg(updates=updates)
    for name in LAYOUT:
        np.testing.assert_array_equal(result[name], listed[name])
    assert_within_float32_sum_bound(result, updates)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "median", "trimmed_mean"])
def test_every_strategy_streamed_equals_aggregate_on_the_list(name: str) -> None:
    updates = make_updates(5, seed=4)
    settings = StrategySettings.model_validate(
        {"name": name, "proximal_mu": 0.01 if name == "fedprox" else 0.0, "trim_fraction": 0.2}
    )
    global_weights = {n: np.zeros(shape, dtype=np.float32) for n, shape in LAYOUT.items()}
    aggregation = RoundAggregation(settings=settings, global_weights=global_weights)
    for update in updates:
        aggregation.add(update=update)
    assert aggregation.sites == ("s0", "s1", "s2", "s3", "s4")
    streamed_result = aggregation.finish(state=None)
    listed = aggregate(
        settings=settings, state=None, global_weights=global_weights, updates=updates
    )
    for array_name in LAYOUT:
        np.testing.assert_array_equal(
            streamed_result.weights[array_name], listed.weights[array_name]
        )
    assert (streamed_result.state is None) == (name != "fedadam")


def test_order_changes_the_result_only_by_rounding() -> None:
    updates = make_updates(4, seed=1)
    results = [streamed(list(order)) for order in itertools.permutations(updates)]
    for result in results:
        assert_within_float32_sum_bound(result, updates)
    first = results[0]["conv.weight"]
    # Not bit for bit: the order does change float32 rounding, here and there, by an ulp.
    spread = max(np.max(np.abs(r["conv.weight"] - first)) for r in results)
    assert spread <= 4 * np.spacing(np.max(np.abs(first)))


def test_one_site_is_its_own_mean_bit_for_bit() -> None:
    (update,) = make_updates(1, seed=2)
    result = streamed([update])
    for name in LAYOUT:
        np.testing.assert_array_equal(result[name], update.weights[name])


def test_equal_weights_give_the_plain_mean() -> None:
    a = SiteUpdate(
        site_id="a", round=1, weights={"w": np.array([1.0, 2.0], dtype=np.float32)}, num_patients=7
    )
    b = SiteUpdate(
        site_id="b", round=1, weights={"w": np.array([3.0, -4.0], dtype=np.float32)}, num_patients=7
    )
    total = WeightedSum(layout={"w": (2,)})
    total.add(update=a, weight=7)
    total.add(update=b, weight=7)
    assert total.total_weight == 14
    np.testing.assert_array_equal(total.result()["w"], np.array([2.0, -1.0], dtype=np.float32))


@pytest.mark.parametrize("weight", [0, -3, float("nan"), float("inf")])
def test_weights_that_are_not_positive_are_refused(weight: float) -> None:
    total = WeightedSum(layout=LAYOUT)
    (update,) = make_updates(1)
    with pytest.raises(AggregationError, match=r"site 's0': weight .* not a positive number"):
        total.add(update=update, weight=weight)
    assert total.sites == ()


def test_round_refuses_zero_patients_as_fedavg_does() -> None:
    updates = make_updates(2)
    zero = SiteUpdate(site_id="z", round=1, weights=updates[0].weights, num_patients=0)
    aggregation = RoundAggregation(
        settings=StrategySettings(name="fedavg"), global_weights=updates[0].weights
    )
    aggregation.add(update=updates[1])
    with pytest.raises(AggregationError, match="site 'z' reports 0 patients"):
        aggregation.add(update=zero)
    assert aggregation.sites == ("s1",)


def test_updates_that_do_not_fit_the_layout_are_refused_by_name() -> None:
    (update,) = make_updates(1)
    wrong = SiteUpdate(
        site_id="odd",
        round=1,
        weights={**update.weights, "head": np.zeros((2, 2), dtype=np.float32)},
        num_patients=3,
    )
    total = WeightedSum(layout=LAYOUT)
    with pytest.raises(AggregationError, match=r"site 'odd': arrays \['head'\]"):
        total.add(update=wrong, weight=3)
    aggregation = RoundAggregation(
        settings=StrategySettings(name="median"), global_weights=update.weights
    )
    with pytest.raises(AggregationError, match=r"site 'odd': arrays \['head'\].*global model"):
        aggregation.add(update=wrong)


def test_no_update_no_result() -> None:
    with pytest.raises(AggregationError, match="no site updates"):
        WeightedSum(layout=LAYOUT).result()


def test_the_result_is_read_only_and_closes_the_sum() -> None:
    updates = make_updates(2)
    total = WeightedSum(layout=LAYOUT)
    total.add(update=updates[0], weight=1)
    result = total.result()
    assert not result["conv.weight"].flags.writeable
    with pytest.raises(AggregationError, match="result has been taken"):
        total.add(update=updates[1], weight=1)
    with pytest.raises(AggregationError, match="result has been taken"):
        total.result()


def test_an_overflow_of_the_sums_is_an_error_not_an_infinite_model() -> None:
    big = np.full(4, 3e38, dtype=np.float32)
    total = WeightedSum(layout={"w": (4,)})
    for site in "ab":
        total.add(
            update=SiteUpdate(site_id=site, round=1, weights={"w": big}, num_patients=1), weight=1
        )
    with pytest.raises(AggregationError, match=r"4 values of array 'w' .* infinite or NaN"):
        total.result()
    with pytest.raises(AggregationError, match="infinite or NaN"):
        total.result()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_an_update_with_non_finite_values_gives_no_model(bad: float) -> None:
    updates = make_updates(3)
    weights = {name: np.array(values) for name, values in updates[1].weights.items()}
    weights["conv.weight"][2, 5] = bad
    updates[1] = SiteUpdate(site_id="s1", round=1, weights=weights, num_patients=9)
    with pytest.raises(AggregationError, match=r"1 values of array 'conv.weight'"):
        streamed(updates)


def test_the_same_updates_in_the_same_order_give_the_same_bits() -> None:
    updates = make_updates(9, seed=11)
    first, second = streamed(updates), streamed(list(updates))
    for name in LAYOUT:
        assert first[name].tobytes() == second[name].tobytes()


def test_the_fold_agrees_with_the_two_pass_numpy_fold_to_float32_rounding() -> None:
    """Against the product-then-sum fold the aggregator used before: one rounding per update."""
    updates = make_updates(12, seed=7)
    result = streamed(updates)
    unit = float(updates[0].num_patients)
    for name in LAYOUT:
        sums = np.array(updates[0].weights[name])
        factors = 1.0
        for update in updates[1:]:
            factor = np.float32(update.num_patients / unit)
            sums += update.weights[name] * factor
            factors += float(factor)
        before = sums / np.float32(factors)
        # Both round once per update, at different places: they differ by at most the error
        # bound of one of them, in units of the weighted mean of the magnitudes.
        unit_error = 2.0**-24 * weighted_average(updates, name, absolute=True)
        difference = np.abs(result[name].astype(np.float64) - before)
        assert result[name].dtype == np.float32
        assert np.all(difference <= (len(updates) + 2) * unit_error)


def test_other_dtypes_and_layouts_are_converted_once_to_the_same_result() -> None:
    updates = make_updates(4, seed=12)
    converted = [
        SiteUpdate(
            site_id=update.site_id,
            round=1,
            weights={
                name: np.asfortranarray(values.astype(np.float64))
                for name, values in update.weights.items()
            },
            num_patients=update.num_patients,
        )
        for update in updates
    ]
    assert not converted[0].weights["conv.weight"].flags.c_contiguous
    expected, got = streamed(updates), streamed(converted)
    for name in LAYOUT:
        np.testing.assert_array_equal(got[name], expected[name])


def test_a_float64_update_beyond_float32_is_refused_by_site() -> None:
    total = WeightedSum(layout={"w": (2,)})
    total.add(
        update=SiteUpdate(site_id="a", round=1, weights={"w": np.ones(2)}, num_patients=1), weight=1
    )
    huge = SiteUpdate(site_id="b", round=1, weights={"w": np.array([1.0, 1e300])}, num_patients=1)
    with pytest.raises(AggregationError, match=r"site 'b'.*overflowed"):
        total.add(update=huge, weight=1)


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_the_fold_runs_on_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    saxpy, sasum, threads = accumulate._blas()
    seen: list[int] = []

    def watched(*args: object, **kwargs: object) -> np.ndarray:
        seen.extend(_blas_threads())
        return saxpy(*args, **kwargs)

    monkeypatch.setattr(accumulate, "_blas", lambda: (watched, sasum, threads))
    before = _blas_threads()
    streamed(make_updates(3))
    assert seen and set(seen) == {1}
    assert _blas_threads() == before


def test_the_sum_holds_one_model_whatever_the_number_of_sites() -> None:
    total = WeightedSum(layout=LAYOUT)
    held = total.nbytes
    assert held == MODEL_BYTES  # the sums, nothing per site
    for update in make_updates(3, seed=5) + make_updates(30, seed=6):
        total.add(update=update, weight=update.num_patients)
        assert total.nbytes == held
    assert len(total.sites) == 33


def test_an_added_update_is_not_kept() -> None:
    (update,) = make_updates(1)
    other = make_updates(1, seed=9)[0]
    total = WeightedSum(layout=LAYOUT)
    total.add(update=other, weight=2)
    total.add(update=update, weight=5)
    gone = weakref.ref(update)
    del update
    gc.collect()
    assert gone() is None


def test_robust_strategies_hold_every_update() -> None:
    updates = make_updates(6)
    for name in ("median", "trimmed_mean"):
        aggregation = RoundAggregation(
            settings=StrategySettings(name=name), global_weights=updates[0].weights
        )
        for update in updates:
            aggregation.add(update=update)
        assert aggregation.nbytes == len(updates) * MODEL_BYTES
    weighted = RoundAggregation(
        settings=StrategySettings(name="fedavg"), global_weights=updates[0].weights
    )
    for update in updates:
        weighted.add(update=update)
    assert weighted.nbytes == WeightedSum(layout=LAYOUT).nbytes


def test_a_fold_loads_neither_torch_nor_monai() -> None:
    """scipy's BLAS is loaded by the first fold; the aggregator's no-torch rule still holds."""
    code = (
        "import sys, numpy as np\n"
        "from medfed.aggregator.accumulate import WeightedSum\n"
        "from medfed.types import SiteUpdate\n"
        "total = WeightedSum(layout={'w': (3,)})\n"
        "for i in range(3):\n"
        "    weights = {'w': np.ones(3, dtype=np.float32)}\n"
        "    update = SiteUpdate(site_id=str(i), round=1, weights=weights, num_patients=2)\n"
        "    total.add(update=update, weight=i + 1)\n"
        "total.result()\n"
        "print(','.join(m for m in ('scipy', 'torch', 'monai', 'opacus') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "scipy"
