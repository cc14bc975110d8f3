"""Following a submitted run reads only that Flower run's events, even after it ended."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medfed.aggregator.run_store import RunStore, run_directory
from medfed.transport.runner import follow


def _attempt(store: RunStore, *, flower_run_id: int, last: str) -> None:
    store.event("run_started", flower_run_id=flower_run_id, resume_from=None, rounds=2)
    store.event("round_done", round=1)
    store.event(last, reason="test")


def _follow(root: Path, run_id: int) -> list[dict[str, Any]]:
    workspace: Any = SimpleNamespace(root=root)
    return list(follow(workspace=workspace, run_name="study", run_id=run_id, timeout_s=5))


def test_a_run_that_ended_before_it_is_followed_is_read_whole(tmp_path: Path) -> None:
    store = RunStore(directory=run_directory(tmp_path, "study"))
    _attempt(store, flower_run_id=11, last="run_stopped")
    events = _follow(tmp_path, 11)
    assert [e["event"] for e in events] == ["run_started", "round_done", "run_stopped"]


def test_earlier_attempts_under_the_same_name_are_skipped(tmp_path: Path) -> None:
    store = RunStore(directory=run_directory(tmp_path, "study"))
    _attempt(store, flower_run_id=11, last="run_stopped")
    _attempt(store, flower_run_id=12, last="run_finished")
    events = _follow(tmp_path, 12)
    assert [e["event"] for e in events] == ["run_started", "round_done", "run_finished"]
    assert events[0]["flower_run_id"] == 12
