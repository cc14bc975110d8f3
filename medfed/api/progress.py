"""Progress of a federation for people: a line per event, and a table of the sites.

:func:`event_line` is what ``medfed run`` prints, and what a plain terminal, a log or a pipe
gets. In a notebook one output area holds the sites' table (:class:`~medfed.api.site_board.
RoundBoard`) and the latest events, updated in place on every event and about once a second
while a round runs (IPython's display handles, no widget library), so a long run shows its
clocks moving without pushing hundreds of lines into the notebook.
"""

from __future__ import annotations

import contextlib
import html
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from medfed.api.site_board import COLUMNS, RoundBoard, shown_columns
from medfed.api.site_board import number_text as number_text
from medfed.run_events import (
    Evaluation,
    EvaluationFailed,
    EventCallback,
    ModelInitialised,
    PrivacyAlert,
    ReleaseNote,
    RoundDone,
    RoundStarted,
    RunEnded,
    RunEvent,
    RunFailed,
    RunStarted,
    SiteDeclined,
    SiteExhausted,
    SiteLevelPrivacy,
    SiteRejected,
    SiteReplied,
    SitesOnline,
    SiteTimeout,
    SiteUpdated,
)

log = logging.getLogger("medfed.api")

# How many of the latest event lines the notebook table shows under it.
RECENT_LINES = 4


def _how(releases: Mapping[str, ReleaseNote], name: str) -> str:
    """`` [gaussian]`` beside a released number; nothing when it was not released."""
    release = releases.get(name)
    return "" if release is None else f" [{release.mechanism}]"


def event_line(event: RunEvent) -> str | None:
    """The line to print for ``event``, or None for events that need none."""
    match event:
        case RunStarted():
            resumed = event.resume_from
            start = "" if resumed is None else f" (resuming after round {resumed})"
            sites = ", ".join(event.sites)
            return f"run {event.run_name}: {event.rounds} rounds, sites {sites}{start}"
        case SitesOnline():
            missing = f"; missing: {', '.join(event.missing)}" if event.missing else ""
            return f"sites online: {', '.join(event.online) or 'none'}{missing}"
        case ModelInitialised():
            return f"initial model from {event.site} ({event.parameters} parameters)"
        case RoundStarted():
            return f"round {event.round}: training at {', '.join(event.sites)}"
        case SiteReplied():
            return f"  {event.site}: replied to round {event.round}"
        case SiteUpdated():
            releases = event.releases
            return (
                f"  {event.site}: {event.patients} patients{_how(releases, 'patients')}, loss "
                f"{number_text(event.loss)}{_how(releases, 'loss')}, Dice of the global model "
                f"{number_text(event.dice_before)}{_how(releases, 'dice_before')}, "
                f"epsilon {number_text(event.epsilon_spent, 2)} / "
                f"{number_text(event.epsilon_cap, 2)}"
            )
        case PrivacyAlert():
            return f"  PRIVACY ALERT {event.site}: {event.alert}"
        case SiteDeclined():
            return f"  {event.site} declined round {event.round} [{event.code}]: {event.reason}"
        case SiteRejected():
            return f"  {event.site}: update rejected: {'; '.join(event.reasons)}"
        case SiteTimeout():
            return f"  {event.site}: no reply (round {event.round})"
        case SiteExhausted():
            return f"  {event.site}: not asked any more: {event.reason}"
        case RoundDone():
            return (
                f"round {event.round} done: {event.sites_answered}/{event.sites_asked} sites, "
                f"global Dice before the round {number_text(event.dice_before)}, "
                f"{number_text(event.seconds, 1)} s"
            )
        case SiteLevelPrivacy():
            return (
                f"  site-level epsilon (central DP; the unit is a whole site, not a patient) "
                f"{number_text(event.site_level_epsilon, 2)} at delta {event.delta} after "
                f"{event.releases} noisy aggregates"
            )
        case Evaluation():
            per_site = ", ".join(f"{k} {number_text(v)}" for k, v in sorted(event.sites.items()))
            # under secure aggregation the Dice is one masked sum: no site's own is known
            return f"final evaluation: Dice {number_text(event.dice)}" + (
                f" ({per_site})" if per_site else ""
            )
        case EvaluationFailed():
            return f"  {event.site}: evaluation failed: {event.reason}"
        case RunFailed():
            return f"run failed: {event.reason}"
        case RunEnded():
            return f"run {event.status}: {event.reason}"
    return None


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

    def __call__(self, event: RunEvent) -> None:
        line = event_line(event)
        if line is not None:
            print(line, file=self._stream or sys.stdout, flush=True)


def board_text(board: RoundBoard, recent: list[str], *, now: float | None = None) -> str:
    """The board as plain text: a title, a line per site, the latest events."""
    lines = [board.title(now=now)]
    for row in board.rows(now=now):
        parts = [row.state, row.time, row.dice and f"Dice {row.dice}"]
        parts += [row.epsilon and f"epsilon {row.epsilon}", row.note]
        lines.append(f"  {row.site}: " + ", ".join(part for part in parts if part))
    return "\n".join(lines + recent)


def board_html(board: RoundBoard, recent: list[str], *, now: float | None = None) -> str:
    """The board as an HTML table, the latest events under it."""
    rows = board.rows(now=now)
    shown = shown_columns(rows)
    head = "".join(f"<th>{html.escape(COLUMNS[i])}</th>" for i in shown)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row.cells()[i])}</td>" for i in shown) + "</tr>"
        for row in rows
    )
    lines = "<br>".join(html.escape(line) for line in recent)
    return (
        f"<b>{html.escape(board.title(now=now))}</b><table><tr>{head}</tr>{body}</table>"
        f"<small>{lines}</small>"
    )


class NotebookProgress:
    """The sites' table in one Jupyter output area, redrawn on every event and, while a round
    runs, about once a second (its clocks move); :meth:`close` stops the redrawing."""

    def __init__(self, *, tick_s: float = 1.0) -> None:
        self.board = RoundBoard()
        self.recent: list[str] = []
        self._tick_s = tick_s
        self._handle: Any = None
        self._draw_lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, event: RunEvent) -> None:
        self.board.update(event)
        line = event_line(event)
        if line is not None:
            self.recent = [*self.recent, line.strip()][-RECENT_LINES:]
        self._draw()
        if self.board.finished:
            self.close()
        elif self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="medfed-progress", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        self._stop.set()

    def _draw(self) -> None:
        from IPython.display import display

        recent = self.recent
        bundle = {
            "text/plain": board_text(self.board, recent),
            "text/html": board_html(self.board, recent),
        }
        with self._draw_lock:
            if self._handle is None:
                self._handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]
            else:
                self._handle.update(bundle, raw=True)

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            if not self.board.round_running:
                continue
            try:
                self._draw()
            except Exception:  # a display that went away must not end the run
                log.debug("cannot redraw the progress table", exc_info=True)
                return


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


@contextlib.contextmanager
def showing_progress(progress: bool | EventCallback | None) -> Iterator[EventCallback | None]:
    """:func:`progress_callback`, with the notebook table's redrawing stopped at the end."""
    callback = progress_callback(progress)
    try:
        yield callback
    finally:
        if isinstance(callback, NotebookProgress):
            callback.close()
