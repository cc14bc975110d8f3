"""The descriptions the MLflow UI shows first: the run's note and the model version's text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracking_support import FakeRun

from medfed.run_events import RunEnded
from medfed.tracking.descriptions import (
    MAX_NOTE_LENGTH,
    NOTE_TAG,
    epsilon_text,
    model_version_description,
    run_description,
    site_guarantees,
)
from medfed.tracking.operations import Operation, Translator


def _note(ops: list[Operation]) -> str | None:
    for op in ops:
        if op["op"] == "batch":  # a batch's tags are [key, value] pairs
            for key, value in op["tags"]:
                if key == NOTE_TAG:
                    return str(value)
        elif NOTE_TAG in (op.get("tags") or {}):
            return str(op["tags"][NOTE_TAG])
    return None


def test_the_note_tag_is_mlflows() -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    assert NOTE_TAG == MLFLOW_RUN_NOTE


def test_epsilon_is_rounded_up_never_down() -> None:
    assert epsilon_text(7.16623209246934) == "7.167"
    assert epsilon_text(7.1661) == "7.167"
    assert epsilon_text(1.8) == "1.800"  # 1.8 * 1000 is 1800.0000000000002 in floats
    assert epsilon_text(None) == "inf" and epsilon_text(float("inf")) == "inf"


def test_the_run_note_is_written_with_the_last_event(fake_run: Callable[..., FakeRun]) -> None:
    run = fake_run()
    translator = Translator()
    notes = [_note(translator.operations(event)) for event in run.events()]
    assert notes[:-1] == [None] * (len(notes) - 1)  # only the last event knows the numbers
    assert notes[-1] == (
        "Federated training run **trial**: 2 sites (site-a, site-b), strategy fedavg, "
        "2 of 2 rounds; finished.\n\n"
        "Final Dice **0.420** (before training 0.100); epsilon spent (privacy unit: one patient; "
        "rounded up): site-a 1.800 of 8, site-b 2.600 of 6.\n\n"
        "Privacy spent per site (epsilon from each site's signed ledger):\n\n"
        "- site-a: epsilon 1.800 at delta 1e-05 (rdp accountant, cap 8)\n"
        "- site-b: epsilon 2.600 at delta 1e-05 (rdp accountant, cap 6)\n\n"
        "Final model registered as `medfed-trial`."
    )


def test_a_restarted_translator_still_knows_the_strategy_and_rounds(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    first = Translator()
    events = list(run.events())
    for event in events[:-1]:
        first.operations(event)
    restored = Translator.restored(first.state())
    last = events[-1]
    assert isinstance(last, RunEnded)
    note = _note(restored.terminal_operations(last, artifacts=None))
    assert note is not None and "strategy fedavg, 2 of 2 rounds; finished." in note


def test_sites_without_a_budget_and_unbounded_spends(fake_run: Callable[..., FakeRun]) -> None:
    summary: dict[str, Any] = fake_run().summary()
    summary["sites"].append({"site_id": "site-z", "rounds": 0})  # never trained: no budget
    summary["budgets"]["sites"]["site-b"]["epsilon_spent"] = None
    del summary["budgets"]["sites"]["site-a"]["epsilon_cap"]
    summary["dice_final"] = None
    assert [g.site for g in site_guarantees(summary)] == ["site-a", "site-b"]
    text = model_version_description(summary=summary, run_name="trial")
    assert text.splitlines()[2:4] == [
        "- site-a: epsilon 1.800 at delta 1e-05 (rdp accountant, no cap)",
        "- site-b: epsilon inf at delta 1e-05 (rdp accountant, cap 6)",
    ]
    assert text.endswith("after 2 rounds; final Dice not released.")
    assert "site-z" not in text


def test_a_failed_run_has_no_numbers_and_a_huge_one_is_cut(
    fake_run: Callable[..., FakeRun],
) -> None:
    failed = run_description(
        run_name="r",
        sites=["a"],
        strategy="",
        rounds_planned=3,
        status="failed",
        reason="the aggregator stopped",
        summary=None,
    )
    assert failed == (
        "Federated training run **r**: 1 site (a), strategy unknown, 3 rounds planned; "
        "failed: the aggregator stopped."
    )
    summary: dict[str, Any] = fake_run().summary()
    template = dict(summary["budgets"]["sites"]["site-a"])
    sites = [f"hospital-{i:04d}" for i in range(400)]
    summary["sites"] = [{"site_id": s} for s in sites]
    summary["budgets"]["sites"] = {s: {**template, "site_id": s} for s in sites}
    long = run_description(
        run_name="r",
        sites=sites,
        strategy="fedavg",
        rounds_planned=2,
        status="finished",
        reason="",
        summary=summary,
    )
    assert len(long) <= MAX_NOTE_LENGTH and long.endswith("(cut; see the run's summary.json)")
    assert long.startswith(
        "Federated training run **r**: 400 sites (hospital-0000, hospital-0001, hospital-0002, "
        "hospital-0003, hospital-0004, hospital-0005, hospital-0006, hospital-0007, "
        "hospital-0008, hospital-0009 and 390 more), strategy fedavg, 2 of 2 rounds; finished."
    )
    assert (
        "rounded up): hospital-0000 1.800 of 8, " in long
        and "0009 1.800 of 8 and 390 more." in long
    )
    assert "- hospital-0000: epsilon 1.800 at delta 1e-05" in long
