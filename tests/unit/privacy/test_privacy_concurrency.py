"""Several processes of one site reserving at once never overspend and never break the ledger."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from pathlib import Path

from medfed.errors import BudgetExceededError
from medfed.privacy import (
    DPSteps,
    PrivacyTerms,
    RoundPlan,
    SiteLedger,
    compute_epsilon,
    load_or_create_signing_key,
)

DELTA = 1e-5
WORKERS = 6
ALLOWED = 3


def _epsilon(steps: int) -> float:
    history = [DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=steps)]
    return compute_epsilon(history=history, delta=DELTA, accountant="rdp")


def _reserve(
    folder: str,
    worker: int,
    cap_epsilon: float,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[tuple[int, str, int]],
) -> None:
    ledger = SiteLedger(
        path=Path(folder) / "ledger.jsonl", key_path=Path(folder) / "site.pem", site_id="a"
    )
    plan = RoundPlan(
        run_id=f"worker-{worker}",
        round=0,
        planned_rounds=None,
        steps=100,
        sample_rate=0.01,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    terms = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=cap_epsilon)
    barrier.wait()
    try:
        reservation = ledger.reserve(plan=plan, terms=terms)
    except BudgetExceededError:
        results.put((worker, "refused", -1))
    else:
        results.put((worker, "reserved", reservation.seq))


def test_concurrent_reservations_respect_the_cap(tmp_path: Path) -> None:
    cap_epsilon = _epsilon(ALLOWED * 100) * (1 + 1e-9)
    load_or_create_signing_key(tmp_path / "site.pem")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WORKERS)
    results: multiprocessing.Queue[tuple[int, str, int]] = context.Queue()
    processes = [
        context.Process(target=_reserve, args=(str(tmp_path), n, cap_epsilon, barrier, results))
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    reserved = sorted(seq for _, outcome, seq in outcomes if outcome == "reserved")
    assert reserved == list(range(1, ALLOWED + 1))  # after the one terms entry
    assert sum(outcome == "refused" for _, outcome, _ in outcomes) == WORKERS - ALLOWED

    ledger = SiteLedger(path=tmp_path / "ledger.jsonl", key_path=tmp_path / "site.pem", site_id="a")
    report = ledger.verify()
    assert len(report.entries) == ALLOWED + 1 and not report.head_lagging
    assert len(report.terms_changes) == 1  # the terms were written once, by the first writer
    assert {r.run_id for r in report.reservations} == {
        f"worker-{n}" for n, outcome, _ in outcomes if outcome == "reserved"
    }
    assert ledger.spent(delta=DELTA, accountant="rdp") <= cap_epsilon
