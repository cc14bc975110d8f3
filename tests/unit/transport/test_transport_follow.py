"""Following a submitted run reads only that Flower run's events, even after it ended."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from event_support import write_event

from medfed.run_events import RunEvent, RunStarted
from medfed.transport.runner import follow
from medfed.workspace import WorkspaceLayout, run_paths


def _attempt(events: Path, *, flower_run_id: int, last: str) -> None:
    name = "study"
    write_event(events, "run_started", run_name=name, flower_run_id=flower_run_id, rounds=2)
    write_event(events, "round_done", run_name=name, round=1)
    write_event(events, last, run_name=name, reason="test")


def _follow(root: Path, run_id: int) -> list[RunEvent]:
    workspace: Any = SimpleNamespace(root=root, layout=WorkspaceLayout(root=root))
    return list(follow(workspace=workspace, run_name="study", run_id=run_id, timeout_s=5))


def test_a_run_that_ended_before_it_is_followed_is_read_whole(tmp_path: Path) -> None:
    events_file = run_paths(tmp_path, "study").events
    _attempt(events_file, flower_run_id=11, last="run_stopped")
    events = _follow(tmp_path, 11)
    assert [e.kind for e in events] == ["run_started", "round_done", "run_stopped"]


def test_earlier_attempts_under_the_same_name_are_skipped(tmp_path: Path) -> None:
    events_file = run_paths(tmp_path, "study").events
    _attempt(events_file, flower_run_id=11, last="run_stopped")
    _attempt(events_file, flower_run_id=12, last="run_finished")
    events = _follow(tmp_path, 12)
    assert [e.kind for e in events] == ["run_started", "round_done", "run_finished"]
    assert isinstance(events[0], RunStarted) and events[0].flower_run_id == 12
