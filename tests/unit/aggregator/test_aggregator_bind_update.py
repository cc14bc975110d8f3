"""Finding the round's commit entry for an update, on real signed ledgers."""

from __future__ import annotations

import itertools
from pathlib import Path

from medfed.aggregator.rounds import bind_update
from medfed.privacy import CommitEntry, LedgerReport, PrivacyTerms, RoundPlan, SiteLedger

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, epsilon_cap=500.0)
MODEL = "a" * 64


def _plan(run_id: str, round_: int) -> RoundPlan:
    return RoundPlan(
        run_id=run_id,
        round=round_,
        planned_rounds=10,
        steps=20,
        sample_rate=0.01,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


def _update(run_id: str, round_: int, attempt: int = 0) -> str:
    return f"{run_id}-{round_}-{attempt}".encode().hex().ljust(64, "0")[:64]


def _ledger(tmp_path: Path) -> LedgerReport:
    """Two runs' rounds interleaved, a retried round, and a reservation never committed."""
    ledger = SiteLedger(
        path=tmp_path / "site" / "ledger.jsonl", key_path=tmp_path / "k.pem", site_id="site-a"
    )
    for run_id, round_ in [("run-1", 1), ("run-2", 1), ("run-1", 2), ("run-2", 2)]:
        reservation = ledger.reserve(plan=_plan(run_id, round_), terms=TERMS)
        ledger.commit(
            reservation, steps=20, model_sha256=MODEL, update_sha256=_update(run_id, round_)
        )
    for attempt in (1, 2):  # run-1 round 3 reserved and committed twice: the last one counts
        reservation = ledger.reserve(plan=_plan("run-1", 3), terms=TERMS)
        ledger.commit(
            reservation, steps=20, model_sha256=MODEL, update_sha256=_update("run-1", 3, attempt)
        )
    ledger.reserve(plan=_plan("run-2", 3), terms=TERMS)  # open: no commit
    return ledger.verify()


def _last_commit_by_scanning(report: LedgerReport, run_id: str, round_: int) -> int | None:
    """The definition: the last commit entry of any reservation of that run's round."""
    reserved = {r.seq for r in report.runs(run_id) if r.round == round_}
    commits = [
        e.seq
        for e in report.entries
        if isinstance(e, CommitEntry) and e.reservation_seq in reserved
    ]
    return commits[-1] if commits else None


def _bind(report: LedgerReport, run_id: str, round_: int, update: str) -> tuple[object, list[str]]:
    return bind_update(
        report,
        run_id=run_id,
        round=round_,
        model_sha256=MODEL,
        update_sha256=update,
        first_seq=0,
        lines=len(report.entries),
    )


def test_the_round_commit_is_the_last_one_of_that_run_and_round(tmp_path: Path) -> None:
    report = _ledger(tmp_path)
    for run_id, round_ in itertools.product(["run-1", "run-2", "run-3"], [0, 1, 2, 3]):
        attempt = 2 if (run_id, round_) == ("run-1", 3) else 0
        received, problems = _bind(report, run_id, round_, _update(run_id, round_, attempt))
        expected = _last_commit_by_scanning(report, run_id, round_)
        if expected is None:
            assert (received, problems) == (None, [])
            continue
        assert problems == []
        assert getattr(received, "commit_seq", None) == expected


def test_an_update_the_commit_does_not_name_is_refused(tmp_path: Path) -> None:
    report = _ledger(tmp_path)
    received, problems = _bind(report, "run-1", 3, _update("run-1", 3, attempt=1))
    assert getattr(received, "commit_seq", None) == _last_commit_by_scanning(report, "run-1", 3)
    (problem,) = problems
    assert problem.startswith("the site's commit entry (seq ")
    assert "names the update" in problem and problem.endswith("was received")
