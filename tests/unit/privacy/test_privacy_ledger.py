"""The signed, hash-chained privacy ledger: round trips, budget refusals and commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.errors import BudgetExceededError, LedgerError, PrivacyError
from medfed.privacy import (
    BudgetCap,
    DPSteps,
    PrivacyTerms,
    Release,
    ReserveEntry,
    RoundPlan,
    SiteLedger,
    TermsEntry,
    compute_epsilon,
    load_public_key,
    public_key_path,
    verify_ledger,
)

DELTA = 1e-5
TERMS = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=50.0)


def _plan(**overrides: object) -> RoundPlan:
    values: dict[str, object] = {
        "run_id": "run-1",
        "round": 0,
        "planned_rounds": 5,
        "steps": 100,
        "sample_rate": 0.01,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }
    values.update(overrides)
    return RoundPlan(**values)  # type: ignore[arg-type]


def _terms(**overrides: object) -> PrivacyTerms:
    values: dict[str, object] = {"accountant": "rdp", "delta": DELTA, "epsilon_cap": 50.0}
    values.update(overrides)
    return PrivacyTerms(**values)  # type: ignore[arg-type]


def _epsilon(*steps: int, noise: float = 1.0) -> float:
    history = [DPSteps(noise_multiplier=noise, sample_rate=0.01, steps=s) for s in steps]
    return compute_epsilon(history=history, delta=DELTA, accountant="rdp")


def _snapshot(ledger: SiteLedger) -> tuple[bytes, bytes]:
    head = ledger.path.with_name(ledger.path.name + ".head")
    return ledger.path.read_bytes(), head.read_bytes()


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / "ledger.jsonl", key_path=tmp_path / "keys" / "site.pem", site_id="a"
    )


def test_empty_ledger_is_valid_and_spends_nothing(ledger: SiteLedger) -> None:
    report = ledger.verify()
    assert report.entries == () and report.history == ()
    assert ledger.spent(delta=DELTA, accountant="pld") == 0.0
    assert not ledger.key_path.exists()  # looking at a ledger does not create a key


def test_reserve_commit_round_trip(ledger: SiteLedger) -> None:
    first = ledger.reserve(plan=_plan(run_id="état-1"), terms=TERMS)
    # The first write names the terms: seq 0 is the terms entry.
    assert (first.seq, first.plan.steps, first.epsilon_before) == (1, 100, 0.0)
    assert first.epsilon_after == pytest.approx(_epsilon(100), rel=1e-12)
    ledger.commit(first, steps=60)
    second = ledger.reserve(plan=_plan(round=1, noise_multiplier=1.5), terms=TERMS)
    assert second.seq == 3

    report = ledger.verify()
    assert len(report.entries) == 4 and not report.head_lagging
    assert report.terms == TERMS and isinstance(report.entries[0], TermsEntry)
    assert [r.committed_steps for r in report.reservations] == [60, None]
    assert [r.planned_rounds for r in report.reservations] == [5, 5]
    assert report.history == (
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=60),
        DPSteps(noise_multiplier=1.5, sample_rate=0.01, steps=100),
    )
    entry = report.entries[1]
    assert isinstance(entry, ReserveEntry) and entry.run_id == "état-1"
    assert set(entry.library_versions) == {"medfed", "torch", "opacus", "dp-accounting"}
    expected = compute_epsilon(history=report.history, delta=DELTA, accountant="pld")
    assert ledger.spent(delta=DELTA, accountant="pld") == expected
    # Without arguments, the ledger's own terms.
    assert ledger.spent() == compute_epsilon(history=report.history, delta=DELTA, accountant="rdp")

    # An auditor holding only the public key reaches the same result.
    public = load_public_key(public_key_path(ledger.key_path))
    audited = verify_ledger(ledger.path, public_key=public, site_id="a")
    assert audited.history == report.history and audited.entries == report.entries
    with pytest.raises(LedgerError, match=r"line 1 \(seq 0\): entry of site 'a', expected 'b'"):
        verify_ledger(ledger.path, public_key=public, site_id="b")


def test_refused_reservation_spends_nothing(ledger: SiteLedger) -> None:
    terms = _terms(epsilon_cap=_epsilon(200) * (1 + 1e-9))
    ledger.reserve(plan=_plan(round=0), terms=terms)
    ledger.reserve(plan=_plan(round=1), terms=terms)
    before = _snapshot(ledger)
    with pytest.raises(BudgetExceededError) as caught:
        ledger.reserve(plan=_plan(round=2), terms=terms)
    assert _snapshot(ledger) == before
    message = caught.value.message
    assert f"spent epsilon {_epsilon(200):.4g}" in message
    assert f"together {_epsilon(300):.4g}" in message and "cap" in message
    assert "noise_multiplier" in (caught.value.hint or "")
    assert len(ledger.verify().entries) == 3


def test_uncommitted_reservation_counts_in_full(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(100)
    assert len(ledger.verify().open_reservations) == 1
    ledger.commit(reservation, steps=30)
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(30)
    assert ledger.verify().open_reservations == ()


def test_commit_of_zero_steps_spends_nothing(ledger: SiteLedger) -> None:
    ledger.commit(ledger.reserve(plan=_plan(), terms=TERMS), steps=0)
    assert ledger.spent(delta=DELTA, accountant="prv") == 0.0


def test_commit_beyond_reservation_is_refused(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    before = _snapshot(ledger)
    with pytest.raises(LedgerError, match="cannot commit 101 steps for reservation seq 1"):
        ledger.commit(reservation, steps=101)
    assert _snapshot(ledger) == before
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(100)


def test_commit_twice_or_foreign_reservation_is_refused(ledger: SiteLedger, tmp_path: Path) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.commit(reservation, steps=100)
    with pytest.raises(LedgerError, match="already committed"):
        ledger.commit(reservation, steps=50)
    other = SiteLedger(path=tmp_path / "other.jsonl", key_path=ledger.key_path, site_id="a")
    other.reserve(plan=_plan(run_id="other-run"), terms=TERMS)
    with pytest.raises(LedgerError, match="no reservation seq 1 for run 'run-1'"):
        other.commit(reservation, steps=10)


def test_plan_budget_is_checked_with_the_terms_accountant(ledger: SiteLedger) -> None:
    plan = _plan()
    pld = compute_epsilon(history=[plan.dp_steps], delta=DELTA, accountant="pld")
    reservation = ledger.reserve(plan=plan, terms=_terms(accountant="pld", epsilon_cap=pld * 1.001))
    assert reservation.epsilon_after == pld
    assert pld < _epsilon(100)
    assert ledger.spent() == pld  # the ledger's own accountant: PLD, not RDP


def test_a_larger_delta_than_the_ledgers_is_refused(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), terms=TERMS)
    before = _snapshot(ledger)
    with pytest.raises(LedgerError, match=r"delta 0\.001 is larger than the delta 1e-05"):
        ledger.reserve(plan=_plan(round=1), terms=_terms(delta=1e-3))
    assert _snapshot(ledger) == before
    # The same ledger read at a larger delta would report less: the terms pin the delta.
    assert ledger.spent() == _epsilon(100)
    assert ledger.spent() > compute_epsilon(
        history=ledger.verify().history, delta=1e-3, accountant="rdp"
    )


def test_every_change_of_terms_is_a_signed_entry(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.reserve(plan=_plan(round=1), terms=TERMS)  # same terms: nothing new
    ledger.reserve(plan=_plan(round=2), terms=_terms(epsilon_cap=60.0, delta=1e-6))
    ledger.reserve(plan=_plan(round=3), terms=_terms(epsilon_cap=40.0, delta=1e-6))
    report = ledger.verify()
    changes = report.terms_changes
    assert [c.seq for c in changes] == [0, 3, 5]
    assert [c.raised for c in changes] == ["", "cap", ""]
    assert report.terms == _terms(epsilon_cap=40.0, delta=1e-6)
    assert ledger.spent() == compute_epsilon(history=report.history, delta=1e-6, accountant="rdp")


def test_a_gaussian_release_is_budgeted_and_composed(ledger: SiteLedger) -> None:
    release = Release(
        run_id="run-1",
        round=1,
        quantity="validation_dice",
        values={"dice": 0.5},
        mechanism="gaussian",
        noise_multiplier=4.0,
        sensitivity=1.0,
        noise_std=0.2,
        model_sha256="ab" * 32,
    )
    one_release = compute_epsilon(
        history=[DPSteps(noise_multiplier=4.0, sample_rate=1.0, steps=1)],
        delta=DELTA,
        accountant="rdp",
    )
    with pytest.raises(BudgetExceededError):
        ledger.release(release=release, terms=_terms(epsilon_cap=one_release * 0.99))
    assert not ledger.path.exists()
    seq = ledger.release(release=release, terms=TERMS)
    public = Release(
        run_id="run-1",
        round=1,
        quantity="patients",
        values={"train": 10, "validation": 3},
        mechanism="public",
        reason="synthetic data",
    )
    ledger.release(release=public, terms=TERMS)
    report = ledger.verify()
    assert seq == 1 and [r.mechanism for r in report.releases] == ["gaussian", "public"]
    assert report.history == (DPSteps(noise_multiplier=4.0, sample_rate=1.0, steps=1),)
    assert ledger.spent() == one_release
    assert report.latest_release("patients") is not None
    assert report.releases_of(quantity="validation_dice", run_id="run-1")[0].values == {"dice": 0.5}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mechanism": "gaussian", "noise_multiplier": None}, "needs a noise multiplier"),
        (
            {
                "mechanism": "public",
                "noise_multiplier": None,
                "sensitivity": None,
                "noise_std": None,
            },
            "needs reason",
        ),
        ({"mechanism": "public", "reason": "x"}, "has no noise_multiplier"),
        ({"values": {"dice": 0.5}}, "holds the values loss"),
    ],
)
def test_a_malformed_release_is_never_written(
    ledger: SiteLedger, changes: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {
        "run_id": "run-1",
        "round": 1,
        "quantity": "train_loss",
        "values": {"loss": 0.5},
        "mechanism": "gaussian",
        "noise_multiplier": 1.0,
        "sensitivity": 2.0,
        "noise_std": 0.1,
    }
    values.update(changes)
    ledger.reserve(plan=_plan(), terms=TERMS)
    before = _snapshot(ledger)
    with pytest.raises(PrivacyError, match=message):
        ledger.release(release=Release(**values), terms=TERMS)  # type: ignore[arg-type]
    assert _snapshot(ledger) == before


def test_a_format_one_ledger_is_read_and_continued(tmp_path: Path) -> None:
    from medfed.privacy import load_or_create_signing_key
    from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
    from medfed.privacy.keys import key_id
    from medfed.privacy.ledger_head import write_head

    key_path = tmp_path / "keys" / "site.pem"
    key = load_or_create_signing_key(key_path)
    entry = {
        "v": 1,
        "kind": "reserve",
        "seq": 0,
        "prev_hash": GENESIS_HASH,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "site_id": "a",
        "key_id": key_id(key.public_key()),
        "run_id": "old-run",
        "round": 1,
        "steps": 100,
        "sample_rate": 0.01,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "dataset_size": 100,
        "accountant": "rdp",
        "library_versions": {"medfed": "0.0.1"},
    }
    line = canonical_json(sign(entry, key))
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(line + b"\n")
    write_head(path, site_id="a", count=1, last_hash=line_hash(line), private_key=key)
    ledger = SiteLedger(path=path, key_path=key_path, site_id="a")
    old = ledger.verify()
    assert old.terms is None and old.legacy_delta == DELTA
    assert old.history == (DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=100),)
    assert ledger.spent() == _epsilon(100)
    # The next write names the terms first; the old history still counts.
    ledger.reserve(plan=_plan(round=2), terms=TERMS)
    report = ledger.verify()
    assert [type(e).__name__ for e in report.entries] == [
        "ReserveEntry",
        "TermsEntry",
        "ReserveEntry",
    ]
    assert ledger.spent() == _epsilon(100, 100)
    with pytest.raises(LedgerError, match="larger than the delta"):
        ledger.reserve(plan=_plan(round=3), terms=_terms(delta=1e-4))


def test_missing_key_is_not_replaced_for_an_existing_ledger(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.key_path.unlink()
    public_key_path(ledger.key_path).unlink()
    fresh = SiteLedger(path=ledger.path, key_path=ledger.key_path, site_id="a")
    with pytest.raises(LedgerError, match=r"signing key .* does not"):
        fresh.reserve(plan=_plan(round=1), terms=TERMS)
    with pytest.raises(LedgerError, match=r"signing key .* does not"):
        fresh.verify()
    assert not ledger.key_path.exists()


def test_public_key_alone_verifies(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.key_path.unlink()
    reader = SiteLedger(path=ledger.path, key_path=ledger.key_path, site_id="a")
    assert len(reader.verify().entries) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"run_id": ""}, "run id"),
        ({"round": -1}, "round must be"),
        ({"planned_rounds": 0}, "planned_rounds"),
        ({"steps": 0}, "at least one step"),
        ({"sample_rate": 2.0}, "sample rate"),
        ({"noise_multiplier": 0.0}, "noise multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
def test_bad_plans_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        _plan(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"delta": 1.0}, "delta"), ({"accountant": "gdp"}, "unknown accountant")],
)
def test_bad_terms_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        _terms(**overrides)


def test_bad_cap_is_refused() -> None:
    with pytest.raises(PrivacyError, match="epsilon cap"):
        BudgetCap(epsilon=0.0, delta=DELTA)
    with pytest.raises(PrivacyError, match="delta"):
        BudgetCap(epsilon=1.0, delta=0.0)
