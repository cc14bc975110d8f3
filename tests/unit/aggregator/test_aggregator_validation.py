"""Update validation: every problem is found, named by site and array; good updates pass."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.aggregator import Rejection, partition_updates, validate_update
from medfed.aggregator.validation import check_aggregatable
from medfed.errors import AggregationError, ConfigError
from medfed.types import SiteUpdate

REFERENCE = {
    "conv.weight": np.ones((2, 3), dtype=np.float32),
    "conv.bias": np.zeros(2, dtype=np.float32),
}


def good_weights() -> dict[str, np.ndarray]:
    return {name: array.copy() + 0.1 for name, array in REFERENCE.items()}


def make(
    site: str = "site-a",
    round_: int = 4,
    num_patients: int = 10,
    changes: dict[str, np.ndarray | None] | None = None,
) -> SiteUpdate:
    """A valid update for round 4, with ``changes`` applied (None removes an array)."""
    weights: dict[str, np.ndarray | None] = dict(good_weights())
    weights.update(changes or {})
    return SiteUpdate(
        site_id=site,
        round=round_,
        weights={name: array for name, array in weights.items() if array is not None},
        num_patients=num_patients,
    )


def check(update: SiteUpdate, **kwargs: float) -> list[str]:
    return validate_update(update=update, reference=REFERENCE, expected_round=4, **kwargs)


def test_valid_update_has_no_problems() -> None:
    assert check(make()) == []


def test_nan_and_inf_are_counted_per_array() -> None:
    bad = np.ones((2, 3), dtype=np.float32)
    bad[0, 0], bad[1, 2] = np.nan, np.inf
    problems = check(make(site="b", changes={"conv.weight": bad}))
    assert problems == ["site 'b': array 'conv.weight' has 2 non-finite values (NaN/Inf)"]


def test_wrong_shape_is_named() -> None:
    problems = check(make(site="c", changes={"conv.bias": np.zeros(3, dtype=np.float32)}))
    assert problems == ["site 'c': array 'conv.bias' has shape (3,), expected (2,)"]


def test_wrong_dtype_is_named() -> None:
    problems = check(make(site="c", changes={"conv.bias": np.zeros(2, dtype=np.float64)}))
    assert problems == ["site 'c': array 'conv.bias' has dtype float64, expected float32"]


def test_extra_and_missing_keys_are_named() -> None:
    extra = check(make(site="d", changes={"fc.weight": np.zeros(1, dtype=np.float32)}))
    assert extra == ["site 'd': array 'fc.weight' is not in the global model"]
    missing = check(make(site="d", changes={"conv.bias": None}))
    assert missing == ["site 'd': array 'conv.bias' is missing"]


def test_stale_round_is_refused() -> None:
    assert check(make(site="e", round_=3)) == ["site 'e': update is for round 3, expected round 4"]


def test_patients_and_site_id_are_checked() -> None:
    assert check(make(site="f", num_patients=0)) == [
        "site 'f': num_patients is 0, must be at least 1"
    ]
    assert check(make(site="  ")) == ["site '  ': site_id is empty"]


def test_every_problem_is_reported_at_once() -> None:
    bad = np.full((2, 3), np.nan, dtype=np.float32)
    update = make(
        site="g",
        round_=9,
        num_patients=0,
        changes={"conv.weight": bad, "conv.bias": None, "x": np.zeros(1, dtype=np.float32)},
    )
    problems = check(update)
    assert len(problems) == 5
    assert all(p.startswith("site 'g': ") for p in problems)
    joined = "\n".join(problems)
    for fragment in (
        "round 9",
        "num_patients is 0",
        "'conv.bias' is missing",
        "'x' is not",
        "6 non-finite",
    ):
        assert fragment in joined


def test_norm_ratio_is_optional_and_catches_far_updates() -> None:
    far = make(site="h", changes={"conv.weight": np.full((2, 3), 100.0, dtype=np.float32)})
    assert check(far) == []  # off unless asked for
    problems = check(far, max_norm_ratio=10.0)
    assert len(problems) == 1 and problems[0].startswith("site 'h': update is ")
    assert "limit 10" in problems[0]
    assert check(make(), max_norm_ratio=10.0) == []


def test_norm_ratio_skipped_for_zero_reference_and_invalid_limit_refused() -> None:
    zeros = {name: np.zeros_like(a) for name, a in REFERENCE.items()}
    assert (
        validate_update(update=make(), reference=zeros, expected_round=4, max_norm_ratio=1.0) == []
    )
    with pytest.raises(ConfigError):
        check(make(), max_norm_ratio=0.0)


def test_partition_keeps_good_updates_and_explains_bad_ones() -> None:
    good = make(site="good")
    nan = make(site="nan", changes={"conv.bias": np.array([np.nan, 0.0], dtype=np.float32)})
    stale = make(site="stale", round_=2)
    valid, rejected = partition_updates(
        updates=[good, nan, stale], reference=REFERENCE, expected_round=4
    )
    assert valid == [good]
    assert [r.site_id for r in rejected] == ["nan", "stale"]
    assert rejected[0] == Rejection(
        site_id="nan", reasons=("site 'nan': array 'conv.bias' has 1 non-finite values (NaN/Inf)",)
    )
    assert "round 2" in rejected[1].reasons[0]


def test_partition_rejects_a_site_that_sent_twice() -> None:
    first, second, other = make(site="dup"), make(site="dup"), make(site="other")
    valid, rejected = partition_updates(
        updates=[first, other, second], reference=REFERENCE, expected_round=4
    )
    assert valid == [other]
    assert [r.site_id for r in rejected] == ["dup", "dup"]
    assert rejected[0].reasons == ("site 'dup': sent 2 updates for round 4",)


def test_check_aggregatable_refuses_empty_and_mismatched() -> None:
    with pytest.raises(AggregationError):
        check_aggregatable(updates=[])
    odd = make(site="odd", changes={"conv.bias": np.zeros(5, dtype=np.float32)})
    with pytest.raises(AggregationError, match=r"site 'odd'.*conv\.bias"):
        check_aggregatable(updates=[make(), odd])
    with pytest.raises(AggregationError, match="global model"):
        check_aggregatable(updates=[odd], reference=REFERENCE)
    assert check_aggregatable(updates=[make()], reference=REFERENCE) == {
        "conv.weight": (2, 3),
        "conv.bias": (2,),
    }


def test_site_update_holds_read_only_copies() -> None:
    source = np.zeros(2, dtype=np.float32)
    update = SiteUpdate(site_id="a", round=1, weights={"w": source}, num_patients=1)
    source[0] = 5.0  # the caller's array stays writable and is not shared
    assert update.weights["w"][0] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        update.weights["w"][0] = 1.0
    with pytest.raises(TypeError):
        update.weights["v"] = source  # type: ignore[index]
