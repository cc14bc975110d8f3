"""What the aggregator sees: uniformly random inputs, only sums, and no unmasking of one site."""

from __future__ import annotations

import inspect
import itertools
import typing

import numpy as np
import pytest
from scipy import stats
from secagg_support import EPOCH, RUN, ask, masked_inputs, plain_sum, setup

import medfed.secagg as secagg
from medfed.errors import SecureAggregationError
from medfed.secagg import (
    MaskedInput,
    Revealed,
    SecureSum,
    UnmaskRequest,
    choose_scale,
    encode_weighted,
    unmask_sum,
)
from medfed.secagg.masks import add_mask, pair_sign

THREE = ("site-a", "site-b", "site-c")
WORDS = 50_000
ALPHA = 0.01  # fixed seeds make every p-value below reproducible; none sits near this level
POINT = choose_scale(sites=3, max_weight=100, max_abs=1.0, max_error=1e-2)


def _structured(kind: str) -> np.ndarray:
    if kind == "zeros":
        return encode_weighted(point=POINT, weight=0, update=np.zeros(WORDS - 1))
    ramp = np.linspace(-1.0, 1.0, WORDS - 1)
    return encode_weighted(point=POINT, weight=100, update=ramp)


def _masked(kind: str, *, seed: int) -> np.ndarray:
    fed = setup(THREE, seed=seed)
    inputs = {site: _structured(kind) for site in THREE}
    return masked_inputs(fed, round_id=1, inputs=inputs)["site-a"].vector


def _byte_p_value(vector: np.ndarray) -> float:
    counts = np.bincount(vector.view(np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


@pytest.mark.parametrize("kind", ["zeros", "ramp"])
def test_one_sites_masked_input_is_uniform(kind: str) -> None:
    encoded = _structured(kind)
    masked = _masked(kind, seed=21)
    assert _byte_p_value(encoded) < 1e-100  # the test can tell: the plain encoding is far from it
    assert _byte_p_value(masked) > ALPHA
    words = masked.astype(np.float64) / 2.0**32
    assert float(stats.kstest(words, "uniform").pvalue) > ALPHA


def test_different_inputs_give_masked_inputs_of_the_same_distribution() -> None:
    zeros, ramp = _masked("zeros", seed=31), _masked("ramp", seed=32)
    assert float(stats.ks_2samp(zeros, ramp).pvalue) > ALPHA
    table = np.stack([np.bincount(v.view(np.uint8), minlength=256) for v in (zeros, ramp)])
    assert float(stats.chi2_contingency(table).pvalue) > ALPHA
    plain = np.stack(
        [np.bincount(_structured(k).view(np.uint8), minlength=256) + 1 for k in ("zeros", "ramp")]
    )
    assert float(stats.chi2_contingency(plain).pvalue) < 1e-100


def test_a_live_site_called_dropped_stays_masked_by_its_self_mask() -> None:
    fed = setup(THREE, seed=41)
    inputs = {site: _structured("ramp") for site in THREE}
    masked = masked_inputs(fed, round_id=1, inputs=inputs)
    # The aggregator holds site-b's input but calls it dropped, and removes every pairwise mask.
    request = UnmaskRequest(
        run_id=RUN, epoch=EPOCH, round=1, survivors=("site-a", "site-c"), dropped=("site-b",)
    )
    answers = ask(fed, request, answering=["site-a", "site-c"])
    stripped = masked["site-b"].vector.copy()
    for answer in answers:
        add_mask(stripped, answer.pair_keys["site-b"], sign=-pair_sign("site-b", answer.site_id))
    assert _byte_p_value(stripped) > ALPHA
    assert not np.any(stripped == inputs["site-b"])  # nothing of the input shows through
    # ... and no site gives it site-b's self-mask share for this round.
    for site in ("site-a", "site-c"):
        with pytest.raises(SecureAggregationError, match="whose mask was revealed"):
            ask(fed, _all_survive(1), answering=[site])


def _all_survive(round_id: int) -> UnmaskRequest:
    return UnmaskRequest(run_id=RUN, epoch=EPOCH, round=round_id, survivors=THREE, dropped=())


def test_a_site_asked_for_both_shares_of_one_peer_refuses() -> None:
    fed = setup(THREE)
    both = UnmaskRequest(
        run_id=RUN,
        epoch=EPOCH,
        round=1,
        survivors=THREE,
        dropped=("site-b",),
    )
    with pytest.raises(
        SecureAggregationError,
        match="site-a refuses to reveal both the self-mask share and the mask of site-b",
    ):
        ask(fed, both, answering=["site-a"])
    assert fed.revealed["site-a"] == Revealed()


def test_a_site_refuses_the_second_half_across_two_requests() -> None:
    fed = setup(THREE, rounds=(1, 2))
    ask(fed, _all_survive(1), answering=["site-a"])
    assert ("site-b", 1) in fed.revealed["site-a"].self_seeds
    b_dropped = UnmaskRequest(
        run_id=RUN, epoch=EPOCH, round=1, survivors=("site-a", "site-c"), dropped=("site-b",)
    )
    before = fed.revealed["site-a"]
    with pytest.raises(SecureAggregationError, match="the mask of site-b, whose self-mask share"):
        ask(fed, b_dropped, answering=["site-a"])
    assert fed.revealed["site-a"] == before
    recover_b = UnmaskRequest(
        run_id=RUN,
        epoch=EPOCH,
        round=2,
        survivors=("site-a", "site-c"),
        dropped=("site-b",),
        recover_keys=("site-b",),
    )
    with pytest.raises(SecureAggregationError, match="mask key of site-b, whose self-mask share"):
        ask(fed, recover_b, answering=["site-a"])
    # site-c revealed nothing of site-b yet: it gives the key; site-b is then never a survivor.
    ask(fed, recover_b, answering=["site-c"])
    assert fed.revealed["site-c"].mask_keys == {"site-b"}
    with pytest.raises(SecureAggregationError, match="self-mask share of site-b, whose mask"):
        ask(fed, _all_survive(2), answering=["site-c"])


@pytest.mark.parametrize(
    ("survivors", "dropped", "recover", "message"),
    [
        (("site-a", "site-b"), (), (), "not for the epoch's members"),
        (("site-b", "site-c"), ("site-a",), (), "calls this site dropped"),
        (("site-a", "site-a", "site-b"), ("site-c",), (), "names a site twice"),
        (("site-a", "site-b"), ("site-c",), ("site-b",), "does not call dropped"),
    ],
)
def test_malformed_unmasking_requests_are_refused(
    survivors: tuple[str, ...], dropped: tuple[str, ...], recover: tuple[str, ...], message: str
) -> None:
    fed = setup(THREE)
    request = UnmaskRequest(
        run_id=RUN,
        epoch=EPOCH,
        round=1,
        survivors=survivors,
        dropped=dropped,
        recover_keys=recover,
    )
    with pytest.raises(SecureAggregationError, match=message):
        ask(fed, request, answering=["site-a"])
    with pytest.raises(SecureAggregationError, match="outside key epoch"):
        ask(fed, _all_survive(9), answering=["site-a"])


def test_every_unmasking_gives_the_sum_of_at_least_the_threshold_and_nothing_less() -> None:
    sites = ("site-a", "site-b", "site-c", "site-d")
    rounds = tuple(range(1, 16))
    fed = setup(sites, rounds=rounds)
    threshold = fed.aggregator_roster.threshold
    assert threshold == 3
    point = choose_scale(sites=4, max_weight=100, max_abs=1.0, max_error=1e-2)
    inputs = {
        s: encode_weighted(point=point, weight=i + 1, update=np.full(64, 0.1 * i))
        for i, s in enumerate(sites)
    }
    round_ids = iter(rounds)
    for size in range(1, len(sites) + 1):
        for survivors in itertools.combinations(sites, size):
            round_id = next(round_ids)
            masked = masked_inputs(fed, round_id=round_id, inputs={s: inputs[s] for s in survivors})
            request = UnmaskRequest(
                run_id=RUN,
                epoch=EPOCH,
                round=round_id,
                survivors=survivors,
                dropped=tuple(s for s in sites if s not in survivors),
            )
            if size < threshold:
                with pytest.raises(SecureAggregationError, match="needed"):
                    unmask_sum(
                        roster=fed.aggregator_roster,
                        request=request,
                        masked=list(masked.values()),
                        answers=[],
                    )
                continue
            answers = ask(fed, request, answering=survivors)
            result = unmask_sum(
                roster=fed.aggregator_roster,
                request=request,
                masked=list(masked.values()),
                answers=answers,
            )
            assert result.sites == survivors and len(result.sites) >= threshold
            np.testing.assert_array_equal(result.total, plain_sum(inputs[s] for s in survivors))


def test_the_api_hands_the_aggregator_sums_only() -> None:
    returns = {}
    for name in secagg.__all__:
        item = getattr(secagg, name)
        if inspect.isfunction(item):
            returns[name] = typing.get_type_hints(item)["return"]
    # The one function that returns a site's plain vector is the site's own encoder.
    assert [name for name, kind in returns.items() if kind is np.ndarray] == ["encode_weighted"]
    assert [name for name, kind in returns.items() if kind is MaskedInput] == ["mask_input"]
    assert returns["unmask_sum"] is SecureSum
    assert set(SecureSum.__dataclass_fields__) == {"run_id", "epoch", "round", "sites", "total"}
