"""Progress of a federation for people: a line per event in a terminal, a live table in Jupyter.

Both read the events of :func:`medfed.aggregator.federation.run_federation`; the lines are the
ones ``medfed run`` prints (:func:`medfed.cli.progress.event_line`). In a notebook one output
area is updated in place (IPython's display handles, no widget library), so a long run does not
push hundreds of lines into the notebook.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

EventCallback = Callable[[dict[str, Any]], None]
# How many of the latest event lines the notebook table shows under it.
RECENT_LINES = 4


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich output can be updated in place)."""
    shell_module = sys.modules.get("IPython")
    if shell_module is None:
        return False
    shell = shell_module.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class TextProgress:
    """Prints one line per event to ``stream`` (standard output by default)."""

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        from medfed.cli.progress import event_line

        line = event_line(event)
        if line is not None:
            print(line, file=self._stream or sys.stdout, flush=True)


class _Snapshot:
    """What the notebook shows: per-site latest numbers and the last few event lines."""

    def __init__(self) -> None:
        self.title = "federation starting"
        self.sites: dict[str, dict[str, Any]] = {}
        self.lines: list[str] = []

    def update(self, event: Mapping[str, Any]) -> None:
        from medfed.cli.progress import event_line

        kind = event.get("event")
        if kind == "run_started":
            self.title = f"run {event.get('run_name')}: {event.get('rounds')} rounds"
            for site in event.get("sites") or []:
                self.sites.setdefault(str(site), {"status": "waiting"})
        elif kind == "round_started":
            self.title = f"run {event.get('run_name')}: round {event.get('round')}"
        elif kind == "site_update":
            self.sites[str(event["site"])] = {
                "status": f"round {event.get('round')} done",
                "loss": event.get("loss"),
                "Dice": event.get("dice_before"),
                "epsilon": event.get("epsilon_spent"),
                "cap": event.get("epsilon_cap"),
            }
        elif kind in ("site_declined", "site_rejected", "site_timeout", "site_exhausted"):
            self.sites.setdefault(str(event["site"]), {})["status"] = str(kind).replace("_", " ")
        elif kind in ("run_finished", "run_stopped", "run_failed"):
            self.title = f"run {event.get('run_name')}: {str(kind).removeprefix('run_')}"
        line = event_line(event)
        if line is not None:
            self.lines = [*self.lines, line.strip()][-RECENT_LINES:]

    def text(self) -> str:
        rows = [self.title]
        for site, values in sorted(self.sites.items()):
            rows.append(
                f"  {site}: {values.get('status', '')}, loss {_num(values.get('loss'))}, "
                f"Dice {_num(values.get('Dice'))}, epsilon {_num(values.get('epsilon'), 2)}"
                f" / {_num(values.get('cap'), 2)}"
            )
        return "\n".join(rows + self.lines)

    def html(self) -> str:
        head = "".join(
            f"<th>{name}</th>" for name in ("site", "status", "loss", "Dice", "epsilon / cap")
        )
        body = "".join(
            "<tr>"
            f"<td>{html.escape(site)}</td><td>{html.escape(str(v.get('status', '')))}</td>"
            f"<td>{_num(v.get('loss'))}</td><td>{_num(v.get('Dice'))}</td>"
            f"<td>{_num(v.get('epsilon'), 2)} / {_num(v.get('cap'), 2)}</td>"
            "</tr>"
            for site, v in sorted(self.sites.items())
        )
        recent = "<br>".join(html.escape(line) for line in self.lines)
        return (
            f"<b>{html.escape(self.title)}</b><table><tr>{head}</tr>{body}</table>"
            f"<small>{recent}</small>"
        )


class NotebookProgress:
    """A table of the sites' latest numbers, updated in place in a Jupyter output area."""

    def __init__(self) -> None:
        self._snapshot = _Snapshot()
        self._handle: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        from IPython.display import display

        self._snapshot.update(event)
        bundle = {"text/plain": self._snapshot.text(), "text/html": self._snapshot.html()}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        else:
            self._handle.update(bundle, raw=True)


def progress_callback(progress: bool | EventCallback | None) -> EventCallback | None:
    """The event callback ``progress`` asks for: True picks the display for where we run."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return NotebookProgress() if in_notebook() else TextProgress()
    if callable(progress):
        return progress
    from medfed.errors import ConfigError

    raise ConfigError(
        f"progress must be True, False or a callable taking one event, not {progress!r}"
    )


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{float(value):.{digits}f}"
