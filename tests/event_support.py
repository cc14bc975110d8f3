"""Writing a run's events in tests, as the round loop writes them, from their fields; stopping
a run at an event."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.run_events import EVENTS_VERSION, RoundDone, RunEvent, append_event, parse_event


def write_event(path: Path, kind: str, **fields: Any) -> RunEvent:
    """Append the ``kind`` event with ``fields`` to the events file at ``path``."""
    event = parse_event({"v": EVENTS_VERSION, "event": kind, **fields})
    assert event is not None, (kind, fields)
    append_event(path, event)
    return event


class Stopped(Exception):
    """The aggregator stops here (its process was killed, say)."""


def stop_after_round(number: int) -> Callable[[RunEvent], None]:
    """An ``on_event`` that stops the run once round ``number`` is done."""

    def stop(event: RunEvent) -> None:
        if isinstance(event, RoundDone) and event.round == number:
            raise Stopped

    return stop
