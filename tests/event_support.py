"""Writing a run's events in tests, as the round loop writes them, from their fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfed.run_events import EVENTS_VERSION, RunEvent, append_event, parse_event


def write_event(path: Path, kind: str, **fields: Any) -> RunEvent:
    """Append the ``kind`` event with ``fields`` to the events file at ``path``."""
    event = parse_event({"v": EVENTS_VERSION, "event": kind, **fields})
    assert event is not None, (kind, fields)
    append_event(path, event)
    return event
