"""The protocol's values survive JSON, and a round's vector reads back as the weighted mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
from secagg_support import EPOCH, RUN, ask, masked_inputs, setup

from medfed.errors import SecureAggregationError
from medfed.secagg import UnmaskRequest, decode_weighted_sum, encode_weighted, unmask_sum, wire
from medfed.secagg.update import (
    EXTRAS,
    LOSS_RANGE,
    flatten_change,
    loss_extras,
    mean_update,
    run_encoding,
)


def _through_json(value: dict) -> dict:
    return json.loads(json.dumps(value))


def test_every_protocol_value_survives_json() -> None:
    fed = setup(("a", "b", "c"), rounds=(1, 2))
    bundle = fed.bundles[0]
    assert wire.bundle_from_json(_through_json(wire.bundle_to_json(bundle))) == bundle
    roster = fed.rosters["a"]
    back = wire.roster_from_json(_through_json(wire.roster_to_json(roster)))
    assert back.bundles == roster.bundles and back.threshold == roster.threshold
    secrets = fed.secrets["a"]
    again = wire.secrets_from_json(_through_json(wire.secrets_to_json(secrets)))
    assert again.mask_key_bytes() == secrets.mask_key_bytes()
    assert dict(again.self_seeds) == dict(secrets.self_seeds) and again.rounds == secrets.rounds
    held = fed.held["a"]
    opened = wire.held_from_json(_through_json(wire.held_to_json(held)))
    assert opened.members == held.members
    assert {k: (v.mask_key, dict(v.self_seeds)) for k, v in opened.shares.items()} == {
        k: (v.mask_key, dict(v.self_seeds)) for k, v in held.shares.items()
    }
    request = UnmaskRequest(run_id="r", epoch=1, round=2, survivors=("a", "b"), dropped=("c",))
    assert (
        wire.revealed_from_json(_through_json(wire.revealed_to_json(fed.revealed["a"])))
        == (fed.revealed["a"])
    )
    assert wire.request_from_json(_through_json(wire.request_to_json(request))) == request


def test_answers_through_json_unmask_to_the_same_sum() -> None:
    fed = setup(("a", "b", "c"))
    inputs = {s: np.arange(5, dtype=np.uint32) * (i + 1) for i, s in enumerate(fed.sites)}
    masked = masked_inputs(fed, round_id=1, inputs=inputs)
    request = UnmaskRequest(run_id=RUN, epoch=EPOCH, round=1, survivors=fed.sites, dropped=())
    sent = wire.request_from_json(_through_json(wire.request_to_json(request)))
    answers = [
        wire.answer_from_json(_through_json(wire.answer_to_json(answer)))
        for answer in ask(fed, sent, answering=fed.sites)
    ]
    total = unmask_sum(
        roster=fed.aggregator_roster, request=request, masked=list(masked.values()), answers=answers
    )
    np.testing.assert_array_equal(total.total, sum(inputs.values()))


@pytest.mark.parametrize(
    "broken",
    [{}, {"site_id": "a"}, {**{"site_id": 1}, "run_id": "r"}],
)
def test_a_malformed_value_is_a_secure_aggregation_error(broken: dict) -> None:
    with pytest.raises(SecureAggregationError, match="key bundle is malformed"):
        wire.read("key bundle", broken, wire.bundle_from_json)


def test_the_change_is_clipped_to_the_bound_and_the_clipped_coordinates_counted() -> None:
    reference = {"b": np.zeros((2,), np.float32), "a": np.zeros((2, 2), np.float32)}
    weights = {"a": np.array([[0.5, 3.0], [-2.0, 0.0]], np.float32), "b": np.array([np.nan, 1.0])}
    change, clipped = flatten_change(weights=weights, reference=reference, bound=1.0)
    # sorted names: a then b; NaN becomes 0 and counts as clipped
    np.testing.assert_array_equal(change, [0.5, 1.0, -1.0, 0.0, 0.0, 1.0])
    assert clipped == 3


def test_the_decoded_sum_is_the_weighted_mean_within_its_bound() -> None:
    rng = np.random.default_rng(3)
    bound, weights = 0.5, (7, 30, 12)
    reference = {"w": rng.normal(size=(40, 3)).astype(np.float32)}
    point = run_encoding(sites=len(weights), max_weight=100, bound=bound)
    changes = [rng.uniform(-bound, bound, size=120) for _ in weights]
    losses = (0.8, None, 1.4)
    total = np.zeros(1 + 120 + EXTRAS, dtype=np.uint32)
    for weight, change, loss in zip(weights, changes, losses, strict=True):
        encoded = encode_weighted(
            point=point, weight=weight, update=change, extras=loss_extras(loss, bound=bound)
        )
        np.add(total, encoded, out=total)
    decoded = decode_weighted_sum(point=point, total=total, sites=3, extras=EXTRAS)
    mean = mean_update(total=decoded, reference=reference, bound=bound)
    exact = sum(w * c for w, c in zip(weights, changes, strict=True)) / sum(weights)
    expected = reference["w"].astype(np.float64) + exact.reshape(40, 3)
    assert mean.total_weight == sum(weights)
    assert mean.max_error == pytest.approx(3 / (2 * point.scale) / sum(weights))
    float32_rounding = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(mean.weights["w"] - expected) <= mean.max_error + float32_rounding)
    # the loss: weighted by the sites that had one, within the encoding's error scaled back
    loss_error = 3 / (2 * point.scale) * LOSS_RANGE / bound / (7 + 12)
    assert mean.loss == pytest.approx((7 * 0.8 + 12 * 1.4) / 19, abs=loss_error * 2)


def test_losses_beyond_the_range_are_clipped_and_a_missing_one_is_flagged() -> None:
    assert loss_extras(None, bound=0.5) == (0.0, 0.0)
    assert loss_extras(float("nan"), bound=0.5) == (0.0, 0.0)
    assert loss_extras(LOSS_RANGE * 4, bound=0.5) == (0.5, 0.5)
    assert loss_extras(-1.0, bound=0.5) == (0.0, 0.5)
