"""Adaptive clipping in the ledger: the count's noise recorded, the cost that of plain DP-SGD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.audit.accounting import recompute
from medfed.errors import PrivacyError
from medfed.privacy import DPSteps, PrivacyTerms, RoundPlan, SiteLedger, compute_epsilon
from medfed.privacy.accounting import adaptive_clipping_noise, composed_noise_multiplier
from medfed.privacy.entry_format import EntryFormatError, parse_entry
from medfed.privacy.events import ReserveEntry

DELTA = 1e-5
TERMS = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=50.0)
NOISE, RATE, STEPS = 1.1, 0.05, 400


def _plan(**extra: float) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=0,
        planned_rounds=3,
        steps=STEPS,
        sample_rate=RATE,
        noise_multiplier=NOISE,
        max_grad_norm=0.5,
        **extra,  # type: ignore[arg-type]
    )


def _ledger(tmp_path: Path, name: str) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / name / "ledger.jsonl",
        key_path=tmp_path / name / "key.pem",
        site_id="site-a",
    )


def _reserve_line(ledger: SiteLedger) -> dict[str, object]:
    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    (reserve,) = [line for line in lines if line["kind"] == "reserve"]
    return reserve


@pytest.mark.parametrize("count", [3.3, 5.5, 11.0, 1.1000001])
def test_the_split_composes_back_to_the_planned_noise(count: float) -> None:
    split = adaptive_clipping_noise(noise_multiplier=NOISE, count_noise_multiplier=count)
    composed = composed_noise_multiplier(
        sum_noise_multiplier=split.sum_noise_multiplier, count_noise_multiplier=count
    )
    # Rounded up: the pair never has less noise than the ledger charges, and only by ulps more.
    assert NOISE <= composed <= NOISE * (1 + 1e-14)
    assert split.sum_noise_multiplier > NOISE and split.count_std == count / 2
    # Andrew et al.'s sigma_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, with sigma_b = count / 2
    sigma_b = count / 2
    assert split.sum_noise_multiplier == pytest.approx(
        (NOISE**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-14
    )


def test_a_count_noise_at_or_below_the_noise_multiplier_is_refused() -> None:
    for count in (NOISE, 0.5):
        with pytest.raises(PrivacyError, match="must exceed"):
            adaptive_clipping_noise(noise_multiplier=NOISE, count_noise_multiplier=count)
        with pytest.raises(PrivacyError, match="must exceed"):
            _plan(count_noise_multiplier=count)


def test_adaptive_clipping_entries_recompute_to_the_epsilon_of_plain_dp_sgd(
    tmp_path: Path,
) -> None:
    adaptive, plain = _ledger(tmp_path, "adaptive"), _ledger(tmp_path, "plain")
    for ledger, plan in ((adaptive, _plan(count_noise_multiplier=5.5)), (plain, _plan())):
        reservation = ledger.reserve(plan=plan, terms=TERMS)
        ledger.commit(reservation, steps=STEPS - 10)

    recorded = _reserve_line(adaptive)
    assert recorded["count_noise_multiplier"] == 5.5 and recorded["noise_multiplier"] == NOISE
    # A fixed clip writes exactly the fields it always wrote.
    assert "count_noise_multiplier" not in _reserve_line(plain)

    expected = compute_epsilon(
        history=[DPSteps(noise_multiplier=NOISE, sample_rate=RATE, steps=STEPS - 10)],
        delta=DELTA,
        accountant="rdp",
    )
    assert adaptive.history() == plain.history()
    for accountant in ("rdp", "pld"):
        assert adaptive.spent(accountant=accountant) == plain.spent(accountant=accountant)
    assert adaptive.spent() == expected
    # The independent audit recomputation reads the same history from the signed lines.
    audited = recompute(history=adaptive.verify().history, delta=DELTA)
    assert audited == recompute(history=plain.verify().history, delta=DELTA)
    assert audited.opacus_rdp == expected
    # the parsed entries carry the count's noise for readers that show it
    reserves = [e for e in adaptive.verify().entries if isinstance(e, ReserveEntry)]
    assert [e.count_noise_multiplier for e in reserves] == [5.5]


def test_the_reader_refuses_a_count_noise_that_leaves_the_sum_none(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, "adaptive")
    ledger.reserve(plan=_plan(count_noise_multiplier=5.5), terms=TERMS)
    line = _reserve_line(ledger)
    assert parse_entry(line).noise_multiplier == NOISE  # type: ignore[union-attr]
    for bad in (NOISE, 0.3, -1.0, "5"):
        with pytest.raises(EntryFormatError, match="count_noise_multiplier"):
            parse_entry({**line, "count_noise_multiplier": bad})
    # still no other field may be added to a reservation
    with pytest.raises(EntryFormatError, match="unknown fields"):
        parse_entry({**line, "sum_noise_multiplier": 1.2})
