"""A run's progress on a terminal: one line per event, and under them a live table of the sites.

The table (:class:`~medfed.api.site_board.RoundBoard`) is redrawn about once a second, so the
clocks of the sites in training move while nothing else happens; it is drawn only on an
interactive terminal. Piped, in CI or on a dumb terminal the output stays one line per event,
nothing redrawn, as logs and ``| tee`` need it.
"""

from __future__ import annotations

import os
import time
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from medfed.api.progress import event_line
from medfed.api.site_board import COLUMNS, RoundBoard, seconds_text, shown_columns
from medfed.run_events import RunEvent

REFRESH_PER_SECOND = 1.0


def live_wanted(console: Console) -> bool:
    """Whether ``console`` is a terminal a person watches (not a pipe, a file, CI, TERM=dumb)."""
    if os.environ.get("CI"):
        return False
    return console.is_terminal and not console.is_dumb_terminal


def board_table(board: RoundBoard) -> Table | None:
    """The sites as a table, columns with nothing in them left out; None before any site."""
    rows = board.rows()
    if not rows:
        return None
    shown = shown_columns(rows)
    table = Table()
    for index in shown:
        table.add_column(COLUMNS[index], overflow="fold")
    for row in rows:
        cells = row.cells()
        table.add_row(*(Text(cells[index]) for index in shown))
    return table


class _LiveBoard:
    """Rendered afresh at every refresh, so the clocks move between events."""

    def __init__(self, progress: RunProgress) -> None:
        self.progress = progress

    def __rich__(self) -> RenderableType:
        board = self.progress.board
        parts: list[RenderableType] = []
        if board.run_name:
            parts.append(Text(board.title(), style="bold"))
        activity = self.progress.activity()
        if activity:
            parts.append(Text(activity, style="dim"))
        table = board_table(board)
        if table is not None:
            parts.append(table)
        return Group(*parts)


class RunProgress:
    """Prints each event's line; on a terminal, keeps the sites' table live under them.

    Use as a context manager around the run; call it with every event, and with
    :meth:`phase` for what happens before the run's first event or after its last (starting
    processes, waiting for MLflow), which is shown with its clock until the next event.
    """

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.board = RoundBoard()
        self._live_wanted = live_wanted(console) if live is None else live
        self._live: Live | None = None
        self._phase: tuple[str, float] | None = None

    @property
    def live(self) -> bool:
        return self._live is not None

    def __enter__(self) -> RunProgress:
        if self._live_wanted:
            self._live = Live(
                _LiveBoard(self),
                console=self.console,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=True,  # the final summary table takes its place
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __call__(self, event: RunEvent) -> None:
        self.board.update(event)
        self._phase = None
        line = event_line(event)
        if line is not None:
            say(self.console, line)
        self._refresh()

    def phase(self, text: str) -> None:
        """Say what is being done now; the live view shows it with its clock."""
        say(self.console, text)
        self._phase = (text, time.monotonic())
        self._refresh()

    def activity(self) -> str | None:
        """The current phase and how long it has taken; None when events tell the story."""
        phase = self._phase
        if phase is None:
            return None
        text, since = phase
        return f"{text} ({seconds_text(time.monotonic() - since)})"

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()


def say(console: Console, text: str, **options: Any) -> None:
    """One line as it is: no markup (``[dp]`` is text), no wrapping (paths stay whole)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True, **options)
