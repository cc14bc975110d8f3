"""Progress of a federation for people: a line per event in a terminal, a live table in Jupyter.

Both read the events of :mod:`medfed.run_events`; :func:`event_line` is also what ``medfed run``
prints. In a notebook one output area is updated in place (IPython's display handles, no widget
library), so a long run does not push hundreds of lines into the notebook.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Mapping
from typing import Any, TextIO

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
    SiteRejected,
    SitesOnline,
    SiteTimeout,
    SiteUpdated,
)

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
        case Evaluation():
            per_site = ", ".join(f"{k} {number_text(v)}" for k, v in sorted(event.sites.items()))
            return f"final evaluation: Dice {number_text(event.dice)} ({per_site})"
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


class _Snapshot:
    """What the notebook shows: per-site latest numbers and the last few event lines."""

    def __init__(self) -> None:
        self.title = "federation starting"
        self.sites: dict[str, dict[str, Any]] = {}
        self.lines: list[str] = []

    def update(self, event: RunEvent) -> None:
        if isinstance(event, RunStarted):
            self.title = f"run {event.run_name}: {event.rounds} rounds"
            for site in event.sites:
                self.sites.setdefault(site, {"status": "waiting"})
        elif isinstance(event, RoundStarted):
            self.title = f"run {event.run_name}: round {event.round}"
        elif isinstance(event, SiteUpdated):
            self.sites[event.site] = {
                "status": f"round {event.round} done",
                "loss": event.loss,
                "Dice": event.dice_before,
                "epsilon": event.epsilon_spent,
                "cap": event.epsilon_cap,
            }
        elif isinstance(event, SiteDeclined | SiteRejected | SiteTimeout | SiteExhausted):
            self.sites.setdefault(event.site, {})["status"] = event.kind.replace("_", " ")
        elif isinstance(event, RunEnded):
            self.title = f"run {event.run_name}: {event.status}"
        line = event_line(event)
        if line is not None:
            self.lines = [*self.lines, line.strip()][-RECENT_LINES:]

    def text(self) -> str:
        rows = [self.title]
        for site, values in sorted(self.sites.items()):
            rows.append(
                f"  {site}: {values.get('status', '')}, loss {number_text(values.get('loss'))}, "
                f"Dice {number_text(values.get('Dice'))}, "
                f"epsilon {number_text(values.get('epsilon'), 2)} / "
                f"{number_text(values.get('cap'), 2)}"
            )
        return "\n".join(rows + self.lines)

    def html(self) -> str:
        head = "".join(
            f"<th>{name}</th>" for name in ("site", "status", "loss", "Dice", "epsilon / cap")
        )
        body = "".join(
            "<tr>"
            f"<td>{html.escape(site)}</td><td>{html.escape(str(v.get('status', '')))}</td>"
            f"<td>{number_text(v.get('loss'))}</td><td>{number_text(v.get('Dice'))}</td>"
            f"<td>{number_text(v.get('epsilon'), 2)} / {number_text(v.get('cap'), 2)}</td>"
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

    def __call__(self, event: RunEvent) -> None:
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


def number_text(value: Any, digits: int = 3) -> str:
    """A number for people; ``n/a`` for a missing one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{float(value):.{digits}f}"
