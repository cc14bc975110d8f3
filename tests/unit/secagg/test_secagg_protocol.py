"""The whole protocol in memory: sums with and without masking, dropouts, abandoned rounds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from secagg_support import (
    EPOCH,
    RUN,
    advertise_keys,
    ask,
    masked_inputs,
    plain_sum,
    run_round,
    setup,
    share_keys,
)

from medfed.errors import AggregationError, SecureAggregationError
from medfed.secagg import (
    EncryptedShare,
    FixedPoint,
    KeyBundle,
    MaskedInput,
    UnmaskRequest,
    choose_scale,
    decode_weighted_sum,
    encode_weighted,
    unmask_sum,
)

THREE = ("site-a", "site-b", "site-c")
LENGTH = 2000


def _encoded(sites: tuple[str, ...], point: FixedPoint, *, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        site: encode_weighted(
            point=point,
            weight=int(rng.integers(1, point.max_weight + 1)),
            update=rng.uniform(-point.max_abs, point.max_abs, LENGTH).astype(np.float32),
            extras=(float(rng.uniform(0, 1)),),
        )
        for site in sites
    }


def _point(sites: int) -> FixedPoint:
    return choose_scale(sites=sites, max_weight=200, max_abs=1.0, max_error=1e-3)


def test_with_and_without_secure_aggregation_the_sum_is_the_same_within_the_bound() -> None:
    point = _point(5)
    sites = ("a", "b", "c", "d", "e")
    rng = np.random.default_rng(11)
    weights = {site: int(rng.integers(1, 201)) for site in sites}
    updates = {site: rng.uniform(-0.5, 0.5, LENGTH).astype(np.float32) for site in sites}
    dice = {site: float(rng.uniform(0, 1)) for site in sites}
    inputs = {
        s: encode_weighted(point=point, weight=weights[s], update=updates[s], extras=(dice[s],))
        for s in sites
    }
    secure = run_round(setup(sites), round_id=1, inputs=inputs)
    decoded = decode_weighted_sum(
        point=point, total=secure.total, sites=len(secure.sites), extras=1
    )
    # Without secure aggregation: the float64 weighted sum the aggregator computes today.
    plain = sum(weights[s] * updates[s].astype(np.float64) for s in sites)
    assert secure.sites == sites
    assert decoded.weight == sum(weights.values())
    assert np.max(np.abs(decoded.update - plain)) <= point.max_sum_error
    assert abs(decoded.extras[0] - sum(weights[s] * dice[s] for s in sites)) <= point.max_sum_error
    mean = sum(weights[s] * updates[s].astype(np.float64) for s in sites) / sum(weights.values())
    assert np.max(np.abs(decoded.mean() - mean)) <= point.max_sum_error / decoded.weight + 1e-7


def test_masked_sum_equals_the_plain_sum_exactly() -> None:
    inputs = _encoded(THREE, _point(3))
    secure = run_round(setup(THREE), round_id=1, inputs=inputs)
    np.testing.assert_array_equal(secure.total, plain_sum(inputs.values()))


def test_one_of_three_silent_after_key_sharing_is_recovered_exactly() -> None:
    fed = setup(THREE)
    inputs = _encoded(THREE, _point(3))
    secure = run_round(fed, round_id=1, inputs=inputs, silent_before_input=["site-b"])
    assert secure.sites == ("site-a", "site-c")
    np.testing.assert_array_equal(secure.total, inputs["site-a"] + inputs["site-c"])
    # The survivors revealed their round keys with site-b, never site-b's key or self-mask.
    assert fed.revealed["site-a"].pair_keys == {("site-b", 1)}
    assert fed.revealed["site-a"].mask_keys == frozenset()
    assert ("site-b", 1) not in fed.revealed["site-a"].self_seeds


def test_two_of_three_silent_abandon_the_round_with_no_partial_sum() -> None:
    fed = setup(THREE)
    inputs = _encoded(THREE, _point(3))
    with pytest.raises(SecureAggregationError, match="names 1 survivor\\(s\\), 2 needed") as caught:
        run_round(fed, round_id=1, inputs=inputs, silent_before_input=["site-b", "site-c"])
    assert isinstance(caught.value, AggregationError)
    assert caught.value.one_line().startswith("error[secure-aggregation]: site-a: unmasking")
    # The aggregator cannot unmask the lone input either, with or without answers.
    masked = masked_inputs(fed, round_id=1, inputs={"site-a": inputs["site-a"]})
    request = UnmaskRequest(
        run_id=RUN, epoch=EPOCH, round=1, survivors=("site-a",), dropped=("site-b", "site-c")
    )
    with pytest.raises(SecureAggregationError, match="1 site\\(s\\) sent an input, 2 needed"):
        unmask_sum(
            roster=fed.aggregator_roster, request=request, masked=list(masked.values()), answers=[]
        )


def test_a_survivor_silent_before_answering_is_covered_by_the_dropped_sites_key() -> None:
    sites = ("site-a", "site-b", "site-c", "site-d", "site-e")
    fed = setup(sites)
    inputs = _encoded(sites, _point(5))
    secure = run_round(
        fed,
        round_id=1,
        inputs=inputs,
        silent_before_input=["site-e"],
        silent_before_answer=["site-d"],
    )
    assert secure.sites == ("site-a", "site-b", "site-c", "site-d")
    np.testing.assert_array_equal(
        secure.total, plain_sum(inputs[s] for s in ("site-a", "site-b", "site-c", "site-d"))
    )
    assert fed.revealed["site-a"].mask_keys == {"site-e"}


def test_a_forged_site_is_left_out_and_the_others_sum() -> None:
    def forge(bundle: KeyBundle) -> KeyBundle:
        if bundle.site_id != "site-c":
            return bundle
        return replace(bundle, share_public=bytes(reversed(bundle.share_public)))

    fed = share_keys(advertise_keys(("site-a", "site-b", "site-c", "site-d"), forge=forge))
    assert "site-c" in fed.aggregator_roster.excluded
    assert fed.members == ("site-a", "site-b", "site-d")
    inputs = _encoded(("site-a", "site-b", "site-d"), _point(4))
    secure = run_round(fed, round_id=1, inputs=inputs)
    np.testing.assert_array_equal(secure.total, plain_sum(inputs.values()))


def test_one_key_agreement_serves_every_round_of_the_epoch() -> None:
    fed = setup(THREE, rounds=(1, 2, 3))
    point = _point(3)
    held = dict(fed.held)
    masks = []
    for round_id in (1, 2, 3):
        inputs = _encoded(THREE, point, seed=round_id)
        secure = run_round(fed, round_id=round_id, inputs=inputs)
        np.testing.assert_array_equal(secure.total, plain_sum(inputs.values()))
        (sent,) = [
            item
            for item in fed.seen
            if isinstance(item, MaskedInput) and item.site_id == "site-a" and item.round == round_id
        ]
        masks.append(sent.vector - inputs["site-a"])
    # Each round masks with different words, although no key or share was exchanged again.
    assert fed.held == held
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[2])


def test_a_site_dropped_in_a_later_round_is_recovered_from_round_keys_alone() -> None:
    fed = setup(THREE, rounds=(1, 2))
    point = _point(3)
    run_round(fed, round_id=1, inputs=_encoded(THREE, point, seed=1))
    inputs = _encoded(THREE, point, seed=2)
    secure = run_round(fed, round_id=2, inputs=inputs, silent_before_input=["site-c"])
    np.testing.assert_array_equal(secure.total, inputs["site-a"] + inputs["site-b"])
    assert fed.revealed["site-a"].mask_keys == frozenset()


def test_a_key_that_would_open_earlier_rounds_is_never_recovered() -> None:
    sites = ("site-a", "site-b", "site-c", "site-d", "site-e")
    fed = setup(sites, rounds=(1, 2))
    point = _point(5)
    run_round(fed, round_id=1, inputs=_encoded(sites, point, seed=1))
    # Round 2: site-e drops, site-d goes silent before answering: the pair (d, e) needs e's
    # mask key, which would unmask e's round-1 input together with its revealed self-mask.
    with pytest.raises(SecureAggregationError, match="refuses to reveal the mask key of site-e"):
        run_round(
            fed,
            round_id=2,
            inputs=_encoded(sites, point, seed=2),
            silent_before_input=["site-e"],
            silent_before_answer=["site-d"],
        )


def test_a_round_outside_the_epoch_needs_new_keys() -> None:
    fed = setup(THREE, rounds=(1,))
    with pytest.raises(SecureAggregationError, match="outside key epoch"):
        run_round(fed, round_id=2, inputs=_encoded(THREE, _point(3)))


def test_damaged_shares_are_refused_by_their_recipient() -> None:
    def flip(item: EncryptedShare) -> EncryptedShare:
        if item.recipient != "site-b":
            return item
        return replace(item, ciphertext=bytes([item.ciphertext[0] ^ 1]) + item.ciphertext[1:])

    with pytest.raises(
        SecureAggregationError, match=r"site-b: shares from site-[ac] in key epoch 1 do not decrypt"
    ):
        share_keys(advertise_keys(THREE), tamper=flip)

    def redirect(item: EncryptedShare) -> EncryptedShare:
        return (
            replace(item, sender="site-c")
            if item.sender == "site-a" and item.recipient == "site-b"
            else item
        )

    with pytest.raises(
        SecureAggregationError, match=r"site-b: shares from site-c .* do not decrypt"
    ):
        share_keys(advertise_keys(THREE), tamper=redirect)


def test_silence_during_share_distribution_shrinks_the_members() -> None:
    sites = ("site-a", "site-b", "site-c", "site-d")
    fed = share_keys(advertise_keys(sites), silent=["site-d"])
    assert fed.members == ("site-a", "site-b", "site-c")
    assert all(held.members == fed.members for held in fed.held.values())
    inputs = _encoded(fed.members, _point(4))
    secure = run_round(fed, round_id=1, inputs=inputs)
    np.testing.assert_array_equal(secure.total, plain_sum(inputs.values()))
    with pytest.raises(SecureAggregationError, match=r"shares from 2 site\(s\).*3 needed"):
        share_keys(advertise_keys(sites), silent=["site-c", "site-d"])


def test_inputs_and_answers_from_outside_the_round_are_refused() -> None:
    fed = setup(THREE)
    inputs = _encoded(THREE, _point(3))
    masked = masked_inputs(fed, round_id=1, inputs=inputs)
    request = UnmaskRequest(
        run_id=RUN, epoch=EPOCH, round=1, survivors=("site-a", "site-b"), dropped=("site-c",)
    )
    answers = ask(fed, request, answering=["site-a", "site-b"])
    with pytest.raises(SecureAggregationError, match="but the survivors are"):
        unmask_sum(
            roster=fed.aggregator_roster,
            request=request,
            masked=list(masked.values()),
            answers=answers,
        )
    two = [masked["site-a"], masked["site-b"]]
    with pytest.raises(SecureAggregationError, match="1 share\\(s\\) received, 2 needed"):
        unmask_sum(roster=fed.aggregator_roster, request=request, masked=two, answers=answers[:1])
    total = unmask_sum(roster=fed.aggregator_roster, request=request, masked=two, answers=answers)
    np.testing.assert_array_equal(total.total, inputs["site-a"] + inputs["site-b"])


def test_answers_only_unmask_the_request_they_were_given_to() -> None:
    fed = setup(THREE)
    inputs = _encoded(THREE, _point(3))
    masked = list(masked_inputs(fed, round_id=1, inputs=inputs).values())
    request = UnmaskRequest(
        run_id=RUN, epoch=EPOCH, round=1, survivors=("site-a", "site-b"), dropped=("site-c",)
    )
    answers = ask(fed, request, answering=["site-a", "site-b"])
    everyone = UnmaskRequest(run_id=RUN, epoch=EPOCH, round=1, survivors=THREE, dropped=())
    with pytest.raises(SecureAggregationError, match="was given to another request"):
        unmask_sum(roster=fed.aggregator_roster, request=everyone, masked=masked, answers=answers)
    stranger = replace(request, dropped=("site-c", "site-x"))
    with pytest.raises(SecureAggregationError, match="distinct sites of the roster"):
        unmask_sum(roster=fed.aggregator_roster, request=stranger, masked=masked, answers=answers)
    moved = replace(answers[0], x=answers[1].x)
    with pytest.raises(SecureAggregationError, match="at point 2, not at its point 1"):
        unmask_sum(
            roster=fed.aggregator_roster,
            request=request,
            masked=masked[:2],
            answers=[moved, answers[1]],
        )
