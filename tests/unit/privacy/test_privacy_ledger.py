"""The signed, hash-chained privacy ledger: round trips, budget refusals and commits."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.errors import BudgetExceededError, LedgerError, PrivacyError
from medfed.privacy import (
    BudgetCap,
    DPSteps,
    ReserveEntry,
    RoundPlan,
    SiteLedger,
    compute_epsilon,
    load_public_key,
    public_key_path,
    verify_ledger,
)

DELTA = 1e-5
CAP = BudgetCap(epsilon=50.0, delta=DELTA)


def _plan(**overrides: object) -> RoundPlan:
    values: dict[str, object] = {
        "run_id": "run-1",
        "round": 0,
        "steps": 100,
        "sample_rate": 0.01,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "dataset_size": 100,
        "accountant": "rdp",
    }
    values.update(overrides)
    return RoundPlan(**values)  # type: ignore[arg-type]


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
    first = ledger.reserve(plan=_plan(run_id="état-1"), cap=CAP)
    assert (first.seq, first.steps, first.epsilon_before) == (0, 100, 0.0)
    assert first.epsilon_after == pytest.approx(_epsilon(100), rel=1e-12)
    ledger.commit(first, steps=60)
    second = ledger.reserve(plan=_plan(round=1, noise_multiplier=1.5), cap=CAP)
    assert second.seq == 2

    report = ledger.verify()
    assert len(report.entries) == 3 and not report.head_lagging
    assert [r.committed_steps for r in report.reservations] == [60, None]
    assert report.history == (
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=60),
        DPSteps(noise_multiplier=1.5, sample_rate=0.01, steps=100),
    )
    entry = report.entries[0]
    assert isinstance(entry, ReserveEntry) and entry.run_id == "état-1"
    assert set(entry.library_versions) == {"medfed", "torch", "opacus", "dp-accounting"}
    expected = compute_epsilon(history=report.history, delta=DELTA, accountant="pld")
    assert ledger.spent(delta=DELTA, accountant="pld") == expected

    # An auditor holding only the public key reaches the same result.
    public = load_public_key(public_key_path(ledger.key_path))
    audited = verify_ledger(ledger.path, public_key=public, site_id="a")
    assert audited.history == report.history and audited.entries == report.entries
    with pytest.raises(LedgerError, match=r"line 1 \(seq 0\): entry of site 'a', expected 'b'"):
        verify_ledger(ledger.path, public_key=public, site_id="b")


def test_refused_reservation_spends_nothing(ledger: SiteLedger) -> None:
    cap = BudgetCap(epsilon=_epsilon(200) * (1 + 1e-9), delta=DELTA)
    ledger.reserve(plan=_plan(round=0), cap=cap)
    ledger.reserve(plan=_plan(round=1), cap=cap)
    before = _snapshot(ledger)
    with pytest.raises(BudgetExceededError) as caught:
        ledger.reserve(plan=_plan(round=2), cap=cap)
    assert _snapshot(ledger) == before
    message = caught.value.message
    assert f"spent epsilon {_epsilon(200):.4g}" in message
    assert f"together {_epsilon(300):.4g}" in message and "cap" in message
    assert "noise_multiplier" in (caught.value.hint or "")
    assert len(ledger.verify().entries) == 2


def test_uncommitted_reservation_counts_in_full(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), cap=CAP)
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(100)
    assert len(ledger.verify().open_reservations) == 1
    ledger.commit(reservation, steps=30)
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(30)
    assert ledger.verify().open_reservations == ()


def test_commit_of_zero_steps_spends_nothing(ledger: SiteLedger) -> None:
    ledger.commit(ledger.reserve(plan=_plan(), cap=CAP), steps=0)
    assert ledger.spent(delta=DELTA, accountant="prv") == 0.0


def test_commit_beyond_reservation_is_refused(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), cap=CAP)
    before = _snapshot(ledger)
    with pytest.raises(LedgerError, match="cannot commit 101 steps for reservation seq 0"):
        ledger.commit(reservation, steps=101)
    assert _snapshot(ledger) == before
    assert ledger.spent(delta=DELTA, accountant="rdp") == _epsilon(100)


def test_commit_twice_or_foreign_reservation_is_refused(ledger: SiteLedger, tmp_path: Path) -> None:
    reservation = ledger.reserve(plan=_plan(), cap=CAP)
    ledger.commit(reservation, steps=100)
    with pytest.raises(LedgerError, match="already committed"):
        ledger.commit(reservation, steps=50)
    other = SiteLedger(path=tmp_path / "other.jsonl", key_path=ledger.key_path, site_id="a")
    other.reserve(plan=_plan(run_id="other-run"), cap=CAP)
    with pytest.raises(LedgerError, match="no reservation seq 0 for run 'run-1'"):
        other.commit(reservation, steps=10)


def test_plan_budget_is_checked_with_plan_accountant(ledger: SiteLedger) -> None:
    plan = _plan(accountant="pld")
    pld = compute_epsilon(history=[plan.dp_steps], delta=DELTA, accountant="pld")
    reservation = ledger.reserve(plan=plan, cap=BudgetCap(epsilon=pld * 1.001, delta=DELTA))
    assert reservation.epsilon_after == pld
    assert pld < _epsilon(100)


def test_missing_key_is_not_replaced_for_an_existing_ledger(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), cap=CAP)
    ledger.key_path.unlink()
    public_key_path(ledger.key_path).unlink()
    fresh = SiteLedger(path=ledger.path, key_path=ledger.key_path, site_id="a")
    with pytest.raises(LedgerError, match=r"signing key .* does not"):
        fresh.reserve(plan=_plan(round=1), cap=CAP)
    with pytest.raises(LedgerError, match=r"signing key .* does not"):
        fresh.verify()
    assert not ledger.key_path.exists()


def test_public_key_alone_verifies(ledger: SiteLedger) -> None:
    ledger.reserve(plan=_plan(), cap=CAP)
    ledger.key_path.unlink()
    reader = SiteLedger(path=ledger.path, key_path=ledger.key_path, site_id="a")
    assert len(reader.verify().entries) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"run_id": ""}, "run id"),
        ({"round": -1}, "round must be"),
        ({"steps": 0}, "at least one step"),
        ({"sample_rate": 2.0}, "sample rate"),
        ({"noise_multiplier": 0.0}, "noise multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"delta": 1.0}, "delta"),
        ({"dataset_size": 0}, "dataset size"),
        ({"accountant": "gdp"}, "unknown accountant"),
    ],
)
def test_bad_plans_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(PrivacyError, match=message):
        _plan(**overrides)


def test_bad_cap_is_refused() -> None:
    with pytest.raises(PrivacyError, match="epsilon cap"):
        BudgetCap(epsilon=0.0, delta=DELTA)
    with pytest.raises(PrivacyError, match="delta"):
        BudgetCap(epsilon=1.0, delta=0.0)
