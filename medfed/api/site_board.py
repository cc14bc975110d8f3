"""Where every site of a run stands, from the run's events: the table people watch.

:class:`RoundBoard` reads only the events of :mod:`medfed.run_events`, which are the
aggregator's own observations (a request sent, a reply received, a decline, a timeout) and
the numbers the sites released; nothing is asked of a site to draw it. Each site is waiting,
online, training, replied, declined, rejected, timed out, budget spent, and at the end done,
with the time its round has taken so far and the time its last answer took, which is the
estimate for this one. ``medfed run`` and ``medfed demo`` draw it as a live table
(:mod:`medfed.cli.live`), notebooks as an HTML table (:mod:`medfed.api.progress`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfed.run_events import (
    Evaluation,
    EvaluationFailed,
    ModelInitialised,
    PrivacyAlert,
    RoundDone,
    RoundStarted,
    RunEnded,
    RunEvent,
    RunStarted,
    SiteDeclined,
    SiteExhausted,
    SiteRejected,
    SiteReplied,
    SitesOnline,
    SiteTimeout,
    SiteUpdated,
)

# The end-of-run status of a site (the aggregator's record) as people read it.
FINAL_STATES: Mapping[str, str] = {
    "active": "done",
    "exhausted": "budget spent",
    "declined": "declined",
    "failed": "rejected",
    "offline": "offline",
    "waiting": "not online",
}
ALERT = "PRIVACY ALERT"
# States in which the time column shows how long the site's answer (or silence) took.
ANSWERED = frozenset({"replied", "declined", "rejected", "timed out"})
COLUMNS = ("site", "state", "time", "patients", "loss", "Dice", "epsilon / cap", "note")


def number_text(value: Any, digits: int = 3) -> str:
    """A number for people; ``n/a`` for a missing one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{float(value):.{digits}f}"


def seconds_text(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``; empty when unknown."""
    if seconds is None:
        return ""
    whole = max(0, round(seconds))
    return f"{whole} s" if whole < 120 else f"{whole // 60} min {whole % 60:02d} s"


@dataclass(frozen=True)
class SiteState:
    """What the aggregator has seen of one site. Times are the aggregator's clock."""

    state: str = "waiting"
    asked_at: float | None = None  # when this round's request went out, while it runs
    took: float | None = None  # how long its last answer took
    previous: float | None = None  # how long the answer before that took: the estimate
    patients: int | None = None
    loss: float | None = None
    dice: float | None = None
    epsilon: float | None = None
    cap: float | None = None
    note: str = ""


@dataclass(frozen=True)
class BoardRow:
    """One site's line of the table, as text (the order of :data:`COLUMNS`)."""

    site: str
    state: str
    time: str
    patients: str
    loss: str
    dice: str
    epsilon: str
    note: str

    def cells(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def shown_columns(rows: tuple[BoardRow, ...]) -> list[int]:
    """The indexes of the columns with something in them (the site's always)."""
    cells = [row.cells() for row in rows]
    return [i for i, name in enumerate(COLUMNS) if name == "site" or any(c[i] for c in cells)]


class RoundBoard:
    """The state of every site of a run, from its events; safe to read from another thread.

    Event times are the aggregator's clock, which may not be this machine's: the offset
    between them is taken as the smallest delay with which an event arrived here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.run_name = ""
        self.rounds = 0
        self.round = 0
        self.phase = "federation starting"
        self.round_started: float | None = None
        self.last_round_s: float | None = None
        self.ended: RunEnded | None = None
        self.sites: dict[str, SiteState] = {}
        self._offset: float | None = None
        self._resumed = False

    def update(self, event: RunEvent, *, received: float | None = None) -> None:
        arrived = time.time() if received is None else received
        with self._lock:
            delay = arrived - event.time
            self._offset = delay if self._offset is None else min(self._offset, delay)
            self._apply(event)

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def round_running(self) -> bool:
        return self.round_started is not None and self.ended is None

    def notes(self) -> dict[str, str]:
        """Each site's latest note (a decline, a timeout, a spent budget, a privacy alert)."""
        with self._lock:
            return {site: s.note for site, s in self.sites.items() if s.note}

    def title(self, *, now: float | None = None) -> str:
        with self._lock:
            name = f"run {self.run_name}" if self.run_name else "federation"
            if self.ended is not None:
                return f"{name}: {self.ended.status}: {self.ended.reason}"
            if self.round_started is not None:
                last = (
                    f" (the last round took {seconds_text(self.last_round_s)})"
                    if self.last_round_s is not None
                    else ""
                )
                spent = seconds_text(self._since(self.round_started, now))
                return f"{name}: round {self.round} of {self.rounds}, {spent}{last}"
            return f"{name}: {self.phase}"

    def rows(self, *, now: float | None = None) -> tuple[BoardRow, ...]:
        with self._lock:
            return tuple(self._row(site, s, now) for site, s in sorted(self.sites.items()))

    def _since(self, start: float, now: float | None) -> float:
        local = time.time() if now is None else now
        return local - (self._offset or 0.0) - start

    def _row(self, site: str, s: SiteState, now: float | None) -> BoardRow:
        if s.state == "training" and s.asked_at is not None:
            estimate = s.previous if s.previous is not None else self.last_round_s
            spent = seconds_text(self._since(s.asked_at, now))
            clock = spent if estimate is None else f"{spent} (last {seconds_text(estimate)})"
        else:
            clock = seconds_text(s.took) if s.state in ANSWERED else ""
        epsilon = (
            f"{number_text(s.epsilon, 2)} / {number_text(s.cap, 2)}"
            if s.epsilon is not None or s.cap is not None
            else ""
        )
        return BoardRow(
            site=site,
            state=s.state,
            time=clock,
            patients="" if s.patients is None else str(s.patients),
            loss="" if s.loss is None else number_text(s.loss),
            dice="" if s.dice is None else number_text(s.dice),
            epsilon=epsilon,
            note=s.note,
        )

    def _set(self, site: str, **changes: Any) -> None:
        self.sites[site] = dataclasses.replace(self.sites.get(site, SiteState()), **changes)

    def _answered(self, site: str, at: float, state: str, **changes: Any) -> None:
        current = self.sites.get(site, SiteState())
        took = current.took
        if current.state == "training" and current.asked_at is not None:
            took = at - current.asked_at
        self._set(site, state=state, asked_at=None, took=took, **changes)

    def _apply(self, event: RunEvent) -> None:
        match event:
            case RunStarted():
                self.run_name, self.rounds, self.ended = event.run_name, event.rounds, None
                self.round = event.resume_from or 0
                self._resumed = event.resume_from is not None
                self.phase = f"waiting for {len(event.sites)} sites"
                for site in event.sites:
                    self._set(site, state="waiting")
            case SitesOnline():
                for site in event.online:
                    self._set(site, state="online")
                for site in event.missing:
                    self._set(site, state="offline", note="not online when the run started")
                online = f"{len(event.online)} of {len(self.sites)} sites online"
                self.phase = online if self._resumed else f"{online}; asking for the initial model"
            case ModelInitialised():
                self.phase = f"initial model from {event.site}"
            case RoundStarted():
                self.round, self.round_started = event.round, event.time
                for site in event.sites:
                    current = self.sites.get(site, SiteState())
                    # What happened before is over once the site is asked again; an alert is not.
                    note = current.note if current.note.startswith(ALERT) else ""
                    self._set(
                        site,
                        state="training",
                        asked_at=event.time,
                        previous=current.took,
                        note=note,
                    )
            case SiteReplied():
                self._answered(event.site, event.time, "replied")
            case SiteUpdated():
                self._answered(
                    event.site,
                    event.time,
                    "replied",
                    patients=event.patients,
                    loss=event.loss,
                    dice=event.dice_before,
                    epsilon=event.epsilon_spent,
                    cap=event.epsilon_cap,
                )
            case SiteDeclined():
                note = f"declined round {event.round} [{event.code}]: {event.reason}"
                self._answered(event.site, event.time, "declined", note=note)
            case SiteRejected():
                note = f"update rejected: {'; '.join(event.reasons)}"
                self._answered(event.site, event.time, "rejected", note=note)
            case SiteTimeout():
                what = "the initial model" if event.round == 0 else f"round {event.round}"
                self._answered(event.site, event.time, "timed out", note=f"no reply to {what}")
            case SiteExhausted():
                self._set(event.site, state="budget spent", note=event.reason)
            case PrivacyAlert():
                self._set(event.site, note=f"{ALERT}: {event.alert}")
            case RoundDone():
                self.round_started, self.last_round_s = None, event.seconds
                done = f"round {event.round} of {self.rounds} done"
                self.phase = f"{done}; final evaluation" if event.round >= self.rounds else done
            case Evaluation():
                for site, dice in event.sites.items():
                    self._set(site, dice=dice)
                self.phase = "final evaluation done"
            case EvaluationFailed():
                self._set(event.site, note=f"evaluation failed: {event.reason}")
            case RunEnded():
                self.ended, self.round_started = event, None
                self._final(event)

    def _final(self, event: RunEnded) -> None:
        for entry in (event.summary or {}).get("sites", []):
            site = str(entry.get("site_id"))
            current = self.sites.get(site, SiteState())
            state = FINAL_STATES.get(str(entry.get("status")), str(entry.get("status")))
            if state == "done" and event.status != "finished":
                state = "stopped"
            if state == "offline" and current.state == "timed out":
                state = "timed out"
            reason = str(entry.get("reason") or "")
            if state in ("done", "stopped"):
                note = current.note  # an earlier problem the site got over is no note
            elif current.state == state or current.note.startswith(ALERT):
                note = current.note or reason  # the events said more (a decline's code)
            else:
                note = reason or current.note
            self._set(
                site,
                state=state,
                asked_at=None,
                patients=entry.get("patients"),
                dice=entry.get("dice") if entry.get("dice") is not None else current.dice,
                epsilon=entry.get("epsilon_spent"),
                cap=entry.get("epsilon_cap"),
                note=note,
            )
