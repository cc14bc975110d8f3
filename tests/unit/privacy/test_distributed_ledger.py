"""Distributed-noise rounds in the ledger: both guarantees recorded, checked and enforced."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from medfed.errors import BudgetExceededError, LedgerError, PrivacyError
from medfed.privacy import (
    DPSteps,
    PrivacyTerms,
    RoundPlan,
    SiteLedger,
    compute_epsilon,
    load_or_create_signing_key,
)
from medfed.privacy.distributed_noise import DistributedNoise, DistributedPlan
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
from medfed.privacy.ledger_head import write_head

DELTA = 1e-5
TERMS = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=50.0)
NOISE = DistributedNoise(
    clip=1.0, scale=64.0, beta=math.exp(-0.5), dim=1 << 12, local_stddev=60.0, count_weight=16
)
SITES = 9
PLAN_KEYS = {
    "sites",
    "budget",
    "clip",
    "scale",
    "beta",
    "dim",
    "count_weight",
    "local_stddev",
    "distributed_noise_multiplier",
    "local_noise_multiplier",
}


def _distributed(budget: str = "distributed", sites: int = SITES) -> DistributedPlan:
    return DistributedPlan(noise=NOISE, sites=sites, budget=budget)  # type: ignore[arg-type]


def _round(round_: int, plan: DistributedPlan | None = None, **change: Any) -> RoundPlan:
    plan = plan or _distributed()
    fields: dict[str, Any] = {
        "run_id": "run-1",
        "round": round_,
        "planned_rounds": 10,
        "steps": 1,
        "sample_rate": 1.0,
        "noise_multiplier": plan.enforced_noise_multiplier,
        "max_grad_norm": 1.0,
        "distributed": plan,
    }
    return RoundPlan(**{**fields, **change})


def _dp_sgd(round_: int) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round_,
        planned_rounds=10,
        steps=50,
        sample_rate=0.02,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / "ledger.jsonl", key_path=tmp_path / "keys" / "site.pem", site_id="a"
    )


def _objects(ledger: SiteLedger) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ledger.path.read_bytes().splitlines()]


def _rewrite_with_site_key(ledger: SiteLedger, objects: list[dict[str, Any]]) -> None:
    """What only the key holder can do: re-chain, re-sign and re-head arbitrary entries."""
    key = load_or_create_signing_key(ledger.key_path)
    previous, lines = GENESIS_HASH, []
    for obj in objects:
        unsigned = {k: v for k, v in obj.items() if k != "signature"}
        unsigned["prev_hash"] = previous
        line = canonical_json(sign(unsigned, key))
        lines.append(line)
        previous = line_hash(line)
    ledger.path.write_bytes(b"".join(line + b"\n" for line in lines))
    write_head(ledger.path, site_id="a", count=len(lines), last_hash=previous, private_key=key)


def _detected(ledger: SiteLedger, *fragments: str) -> str:
    with pytest.raises(LedgerError) as caught:
        ledger.verify()
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message
    return caught.value.message


def test_the_reservation_records_both_guarantees_and_charges_the_named_one(
    ledger: SiteLedger,
) -> None:
    plan = _distributed()
    ledger.commit(ledger.reserve(plan=_round(1), terms=TERMS), steps=1)
    reserve = _objects(ledger)[1]
    assert reserve["kind"] == "reserve"
    assert set(reserve["distributed"]) == PLAN_KEYS
    assert reserve["distributed"] == plan.to_json()
    assert reserve["distributed"]["distributed_noise_multiplier"] == 2.4333213169614383
    assert reserve["distributed"]["local_noise_multiplier"] == 0.8111071056538127
    assert reserve["noise_multiplier"] == plan.distributed_noise_multiplier
    assert (reserve["sample_rate"], reserve["steps"]) == (1.0, 1)

    report = ledger.verify()
    assert report.has_distributed
    assert report.distributed_plans == {1: plan}
    assert report.reservations[0].noise_multiplier == plan.distributed_noise_multiplier


def test_other_entries_are_written_as_before(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_dp_sgd(1), terms=TERMS)
    reserve = _objects(ledger)[1]
    assert "distributed" not in reserve
    assert set(reserve) == {
        "v",
        "kind",
        "seq",
        "prev_hash",
        "timestamp",
        "site_id",
        "key_id",
        "signature",
        "run_id",
        "round",
        "planned_rounds",
        "steps",
        "sample_rate",
        "noise_multiplier",
        "max_grad_norm",
        "library_versions",
    }
    report = ledger.verify()
    assert not report.has_distributed and report.distributed_plans == {}
    assert report.history_of("local") == report.history_of("distributed") == report.history


def test_each_view_charges_the_distributed_steps_at_its_own_multiplier(
    ledger: SiteLedger,
) -> None:
    plan = _distributed()
    ledger.commit(ledger.reserve(plan=_dp_sgd(1), terms=TERMS), steps=50)
    ledger.commit(ledger.reserve(plan=_round(2), terms=TERMS), steps=1)
    ledger.reserve(plan=_round(3, _distributed("local")), terms=TERMS)  # open: counted in full
    report = ledger.verify()
    dp_sgd = DPSteps(noise_multiplier=1.1, sample_rate=0.02, steps=50)
    distributed = DPSteps(
        noise_multiplier=plan.distributed_noise_multiplier, sample_rate=1.0, steps=1
    )
    local = DPSteps(noise_multiplier=plan.local_noise_multiplier, sample_rate=1.0, steps=1)
    assert report.history == (dp_sgd, distributed, local)
    assert report.history_of("distributed") == (dp_sgd, distributed, distributed)
    assert report.history_of("local") == (dp_sgd, local, local)
    assert ledger.spent(view="distributed") == compute_epsilon(
        history=[dp_sgd, distributed, distributed], delta=DELTA, accountant="rdp"
    )
    assert ledger.spent(view="local") == compute_epsilon(
        history=[dp_sgd, local, local], delta=DELTA, accountant="rdp"
    )
    assert ledger.spent() == compute_epsilon(history=report.history, delta=DELTA, accountant="rdp")
    assert ledger.spent(view="distributed") < ledger.spent() < ledger.spent(view="local")
    with pytest.raises(PrivacyError, match="view"):
        report.history_of("global")  # type: ignore[arg-type]


def test_one_round_alone_pins_the_epsilon_of_each_guarantee(ledger: SiteLedger) -> None:
    ledger.commit(ledger.reserve(plan=_round(1), terms=TERMS), steps=1)
    assert ledger.spent(view="distributed") == pytest.approx(1.7458490058584895, rel=1e-9)
    assert ledger.spent(view="local") == pytest.approx(6.025007864599009, rel=1e-9)
    assert ledger.spent() == ledger.spent(view="distributed")


@pytest.mark.parametrize("budget", ["distributed", "local"])
def test_the_budget_is_enforced_on_the_guarantee_the_plan_names(
    ledger: SiteLedger, budget: str
) -> None:
    """Cap 4: the local epsilon (6.03) passes it, the distributed one (1.75) fits."""
    terms = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=4.0)
    plan = _round(1, _distributed(budget))
    if budget == "distributed":
        reservation = ledger.reserve(plan=plan, terms=terms)
        assert reservation.epsilon_after == pytest.approx(1.7458490058584895, rel=1e-9)
        assert ledger.spent(view="local") > terms.epsilon_cap
    else:
        with pytest.raises(BudgetExceededError, match="cap 4"):
            ledger.reserve(plan=plan, terms=terms)
        assert not ledger.path.exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sample_rate": 0.5}, "one full-batch step"),
        ({"steps": 2}, "one full-batch step"),
        ({"count_noise_multiplier": 9.0}, "adaptive clipping"),
        ({"noise_multiplier": _distributed().local_noise_multiplier}, "Gaussian equivalent"),
        (
            {"noise_multiplier": math.nextafter(_distributed().distributed_noise_multiplier, 9)},
            "Gaussian equivalent",
        ),
    ],
)
def test_a_plan_that_does_not_charge_its_step_as_recorded_is_refused(
    change: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(PrivacyError) as caught:
        _round(1, **change)
    assert fragment in caught.value.message
    assert caught.value.hint


def test_a_distributed_round_needs_an_rdp_accountant(ledger: SiteLedger) -> None:
    prv = PrivacyTerms(accountant="prv", delta=DELTA, epsilon_cap=50.0)
    with pytest.raises(PrivacyError, match="prv accountant") as caught:
        ledger.reserve(plan=_round(1), terms=prv)
    assert "rdp" in (caught.value.hint or "")
    assert not ledger.path.exists()
    classic = PrivacyTerms(accountant="rdp-classic", delta=DELTA, epsilon_cap=50.0)
    ledger.reserve(plan=_round(1), terms=classic)
    # Later terms cannot move the ledger to an accountant its distributed steps do not hold in.
    before = ledger.path.read_bytes()
    with pytest.raises(PrivacyError, match="pld accountant"):
        ledger.reserve(
            plan=_dp_sgd(2), terms=PrivacyTerms(accountant="pld", delta=DELTA, epsilon_cap=50.0)
        )
    assert ledger.path.read_bytes() == before


@pytest.mark.parametrize(
    ("field", "factor", "fragment"),
    [
        ("distributed_noise_multiplier", 1.01, "distributed_noise_multiplier"),
        ("local_noise_multiplier", 1 + 1e-8, "local_noise_multiplier"),
        ("local_stddev", 1.5, "distributed_noise_multiplier"),
        ("count_weight", 0.0, "distributed_noise_multiplier"),
        ("sites", 2, "distributed_noise_multiplier"),
    ],
)
def test_a_resigned_entry_with_misstated_noise_is_found(
    ledger: SiteLedger, field: str, factor: float, fragment: str
) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    stored = objects[1]["distributed"]
    stored[field] = type(stored[field])(stored[field] * factor)
    _rewrite_with_site_key(ledger, objects)
    message = _detected(ledger, "line 2 (seq 1)", fragment)
    assert "Gaussian equivalent" in message


def test_a_multiplier_within_floating_point_noise_of_the_recomputation_verifies(
    ledger: SiteLedger,
) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    stored = objects[1]["distributed"]
    stored["local_noise_multiplier"] *= 1 + 1e-12
    _rewrite_with_site_key(ledger, objects)
    assert ledger.verify().has_distributed


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sample_rate": 0.5}, "sample rate 0.5"),
        ({"steps": 3}, "3 steps"),
        ({"noise_multiplier": 0.8111071056538127}, "is not the distributed guarantee's"),
        ({"count_noise_multiplier": 9.0}, "adaptive clipping"),
    ],
)
def test_a_resigned_entry_that_charges_something_else_is_found(
    ledger: SiteLedger, change: dict[str, Any], fragment: str
) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    objects[1].update(change)
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 2 (seq 1)", fragment)


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_a_ledger_kept_under_a_numerical_accountant_is_found(
    ledger: SiteLedger, accountant: str
) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    objects[0]["accountant"] = accountant
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 2 (seq 1)", f"under the {accountant} accountant")


def test_terms_that_switch_to_prv_after_a_distributed_step_are_found(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    later = {**objects[0], "seq": 2, "accountant": "prv"}
    _rewrite_with_site_key(ledger, [*objects, later])
    _detected(ledger, "line 3 (seq 2)", "prv accountant after distributed-noise reservations")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"extra": 1}, "unknown fields extra"),
        ({"sites": ...}, "missing fields sites"),
        ({"dim": 4096.5}, "'dim'"),
        ({"budget": "global"}, "budget"),
        ({"beta": -0.1}, "beta"),
        ({"clip": "1.0"}, "'clip'"),
        ({"local_noise_multiplier": 0}, "'local_noise_multiplier'"),
    ],
)
def test_the_reader_refuses_a_malformed_distributed_field(
    ledger: SiteLedger, change: dict[str, Any], fragment: str
) -> None:
    ledger.reserve(plan=_round(1), terms=TERMS)
    objects = _objects(ledger)
    stored = {**objects[1]["distributed"], **change}
    objects[1]["distributed"] = {k: v for k, v in stored.items() if v is not ...}
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 2 (seq 1)", "field 'distributed'", fragment)
