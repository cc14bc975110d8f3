"""The events of a federation run: one frozen, versioned record per kind, written and read here.

The aggregator's round loop writes one event per line to the run's ``events.jsonl``
(:class:`medfed.workspace.RunPaths`); `medfed run` follows the file, MLflow tracking turns the
events into runs and metrics, the researcher's API into tables, the audit into statements.
They all read the records below, never the raw JSON: a field that is renamed or added is
renamed or added in one place. Every line carries ``"v"``, the format of this module; lines
without it are format 1, the same fields.

Numbers that may be missing (a withheld Dice, an unbounded epsilon) are ``None``; JSON has no
NaN, so NaN is never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

import numpy as np

from medfed.numbers import finite_or_none
from medfed.storage import make_private_dirs

EVENTS_VERSION: Final = 1

log = logging.getLogger("medfed.events")


@dataclass(frozen=True, kw_only=True)
class RunEvent:
    """What every event has: when it happened, in which run."""

    kind: ClassVar[str] = "event"

    run_name: str
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The event's line: ``v``, ``event`` (its kind), then its fields."""
        data = {name.name: getattr(self, name.name) for name in dataclasses.fields(self)}
        return {"v": EVENTS_VERSION, "event": self.kind, **_jsonable(data)}

    def describe(self) -> str:
        """``kind key=value ...`` for a log line."""
        skip = {"run_name", "time", "sites", "settings", "summary", "releases"}
        values = " ".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in skip
        )
        return f"{self.kind} {values}".rstrip()


@dataclass(frozen=True, kw_only=True)
class RunStarted(RunEvent):
    kind: ClassVar[str] = "run_started"

    flower_run_id: int | None = None
    resume_from: int | None = None
    rounds: int = 0
    sites: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SitesOnline(RunEvent):
    kind: ClassVar[str] = "sites_online"

    online: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ModelInitialised(RunEvent):
    kind: ClassVar[str] = "model_initialised"

    site: str
    parameters: int


@dataclass(frozen=True, kw_only=True)
class RoundStarted(RunEvent):
    kind: ClassVar[str] = "round_started"

    round: int
    sites: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ReleaseNote:
    """How a released number was released: its mechanism, its noise, its ledger entry."""

    mechanism: str
    noise_std: float | None = None
    seq: int | None = None

    def describe(self) -> str:
        """``gaussian (std 0.12)``, ``dp-sgd (std 0.3)``, ``public``."""
        if self.noise_std is None or not math.isfinite(self.noise_std):
            return self.mechanism
        return f"{self.mechanism} (std {self.noise_std:.3g})"


@dataclass(frozen=True, kw_only=True)
class SiteUpdated(RunEvent):
    """One site's accepted update: every number is a release of its ledger (``releases``)."""

    kind: ClassVar[str] = "site_update"

    site: str
    round: int
    patients: int = 0
    loss: float | None = None
    dice_before: float | None = None
    releases: Mapping[str, ReleaseNote] = field(default_factory=dict)
    epsilon_spent: float | None = None
    epsilon_cap: float | None = None
    delta: float | None = None
    accountant: str | None = None

    @property
    def epsilon_remaining(self) -> float | None:
        if self.epsilon_spent is None or self.epsilon_cap is None:
            return None
        return self.epsilon_cap - self.epsilon_spent


@dataclass(frozen=True, kw_only=True)
class SiteReplied(RunEvent):
    """A site's reply reached the aggregator, before it is read: the aggregator's own
    observation (which site, when), nothing the site released."""

    kind: ClassVar[str] = "site_replied"

    site: str
    round: int
    message_type: str


@dataclass(frozen=True, kw_only=True)
class SiteDeclined(RunEvent):
    kind: ClassVar[str] = "site_declined"

    site: str
    round: int
    code: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class SiteRejected(RunEvent):
    kind: ClassVar[str] = "site_rejected"

    site: str
    round: int
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class SiteTimeout(RunEvent):
    kind: ClassVar[str] = "site_timeout"

    site: str
    round: int
    message_type: str


@dataclass(frozen=True, kw_only=True)
class SiteExhausted(RunEvent):
    kind: ClassVar[str] = "site_exhausted"

    site: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class PrivacyAlert(RunEvent):
    """A site raised its cap or its delta, or names a cap above the one agreed with it."""

    kind: ClassVar[str] = "privacy_alert"

    site: str
    round: int
    alert: str


@dataclass(frozen=True, kw_only=True)
class RoundDone(RunEvent):
    kind: ClassVar[str] = "round_done"

    round: int
    sites_answered: int = 0
    sites_asked: int = 0
    dice_before: float | None = None
    loss: float | None = None
    seconds: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    epsilon: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SecureEpochStarted(RunEvent):
    """Secure aggregation's keys and shares are in place for ``rounds``: the sites whose
    signed key bundles verified, the sites left out with the reason, and the threshold of
    shares that unmasks a sum."""

    kind: ClassVar[str] = "secure_epoch"

    epoch: int = 0
    rounds: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()
    excluded: Mapping[str, str] = field(default_factory=dict)
    threshold: int = 0


@dataclass(frozen=True, kw_only=True)
class SecureRoundAbandoned(RunEvent):
    """A securely aggregated round that could not be unmasked: the global model is unchanged."""

    kind: ClassVar[str] = "secure_round_abandoned"

    round: int
    epoch: int = 0
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Evaluation(RunEvent):
    """The final global model's Dice, per site (as each released it) and over the sites."""

    kind: ClassVar[str] = "evaluation"

    round: int
    dice: float | None = None
    sites: Mapping[str, float | None] = field(default_factory=dict)
    releases: Mapping[str, ReleaseNote] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EvaluationFailed(RunEvent):
    kind: ClassVar[str] = "evaluation_failed"

    site: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class SiteLevelPrivacy(RunEvent):
    """Site-level (central) DP at the aggregator after a round: the epsilon of every noisy
    aggregate released so far, recomputed from the run's site-level ledger.

    Its unit is a whole site, not a patient: it is never added to, compared with or shown as
    the sites' patient-level epsilons (:class:`SiteUpdated`, :class:`RoundDone`).
    """

    kind: ClassVar[str] = "site_level_privacy"

    round: int
    site_level_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    cohort: int = 0
    releases: int = 0


@dataclass(frozen=True, kw_only=True)
class RunEnded(RunEvent):
    """The last event of a run: finished, stopped (too few sites) or failed."""

    reason: str = ""
    summary: Mapping[str, Any] | None = None

    @property
    def status(self) -> str:
        """``finished``, ``stopped`` or ``failed``."""
        return self.kind.removeprefix("run_")


@dataclass(frozen=True, kw_only=True)
class RunFinished(RunEnded):
    kind: ClassVar[str] = "run_finished"


@dataclass(frozen=True, kw_only=True)
class RunStopped(RunEnded):
    kind: ClassVar[str] = "run_stopped"


@dataclass(frozen=True, kw_only=True)
class RunFailed(RunEnded):
    kind: ClassVar[str] = "run_failed"


KINDS: Final[Mapping[str, type[RunEvent]]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        SitesOnline,
        ModelInitialised,
        RoundStarted,
        SiteUpdated,
        SiteReplied,
        SiteDeclined,
        SiteRejected,
        SiteTimeout,
        SiteExhausted,
        PrivacyAlert,
        RoundDone,
        SecureEpochStarted,
        SecureRoundAbandoned,
        Evaluation,
        EvaluationFailed,
        SiteLevelPrivacy,
        RunFinished,
        RunStopped,
        RunFailed,
    )
}
SITE_ISSUES: Final = (SiteDeclined, SiteRejected, SiteTimeout, SiteExhausted, EvaluationFailed)


def parse_event(data: Mapping[str, Any]) -> RunEvent | None:
    """The event of one decoded line; None (and a warning) for a kind or format it cannot read."""
    kind = data.get("event")
    cls = KINDS.get(str(kind))
    version = data.get("v", 1)
    if cls is None or version != EVENTS_VERSION:
        log.warning("skipping an event of kind %r, format %r", kind, version)
        return None
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name in names:
            values[name] = _field_value(name, value)
    try:
        return cls(**values)
    except TypeError as exc:
        log.warning("skipping a malformed %s event (%s)", kind, exc)
        return None


def _field_value(name: str, value: Any) -> Any:
    if name == "releases" and isinstance(value, Mapping):
        return {
            str(key): ReleaseNote(
                mechanism=str(note.get("mechanism", "")),
                noise_std=finite_or_none(note.get("noise_std")),
                seq=note.get("seq") if isinstance(note.get("seq"), int) else None,
            )
            for key, note in value.items()
            if isinstance(note, Mapping)
        }
    if name in ("sites", "online", "missing", "reasons", "rounds") and isinstance(value, list):
        return tuple(value)
    return value


def append_event(path: Path, event: RunEvent) -> None:
    """Append one event line (flushed at once, so a follower sees it)."""
    make_private_dirs(Path(path).parent)
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(event.to_json(), allow_nan=False) + "\n")


def read_events(path: Path, *, offset: int = 0) -> tuple[list[RunEvent], int]:
    """Complete event lines from byte ``offset`` on, and the offset after the last one.

    A torn last line (a run still writing) is left for the next read.
    """
    try:
        with Path(path).open("rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            decoded = json.loads(line)
        except ValueError:
            log.warning("skipping an unreadable event line in %s", path)
            continue
        event = parse_event(decoded) if isinstance(decoded, dict) else None
        if event is not None:
            events.append(event)
    return events, offset + end


EventCallback = Callable[[RunEvent], None]
"""What is told of each event as it happens (progress displays, MLflow tracking)."""

E = TypeVar("E", bound=RunEvent)


def of_kind(events: Iterable[RunEvent], kind: type[E]) -> list[E]:
    """The events of one kind, in order."""
    return [event for event in events if isinstance(event, kind)]


@dataclass(frozen=True)
class GlobalDice:
    """The Dice of each round's *resulting* global model, as the sites released it.

    A round's global model is measured by the next round's ``dice_before`` (each site evaluates
    the model it is about to train on), and the last one by the final evaluation: this is the
    one place that pairs them. ``sites[site][round]`` and ``overall[round]``, with how each
    site's number was released in ``releases``.
    """

    sites: Mapping[str, Mapping[int, float]]
    releases: Mapping[str, Mapping[int, ReleaseNote]]
    overall: Mapping[int, float]


def global_dice(events: Sequence[RunEvent]) -> GlobalDice:
    """Pair each round with the Dice of the global model it produced (see :class:`GlobalDice`).

    A resumed run's file holds every attempt: a round trained twice counts with its last.
    """
    sites: dict[str, dict[int, float]] = {}
    releases: dict[str, dict[int, ReleaseNote]] = {}
    overall: dict[int, float] = {}
    for event in events:
        if isinstance(event, SiteUpdated) and event.dice_before is not None:
            sites.setdefault(event.site, {})[event.round - 1] = event.dice_before
            note = event.releases.get("dice_before")
            if note is not None:
                releases.setdefault(event.site, {})[event.round - 1] = note
        elif isinstance(event, RoundDone) and event.dice_before is not None:
            overall[event.round - 1] = event.dice_before
        elif isinstance(event, Evaluation):
            if event.dice is not None:
                overall[event.round] = event.dice
            for site, dice in event.sites.items():
                if dice is not None:
                    sites.setdefault(site, {})[event.round] = dice
                    if site in event.releases:
                        releases.setdefault(site, {})[event.round] = event.releases[site]
    return GlobalDice(sites=sites, releases=releases, overall=overall)


def _jsonable(value: Any) -> Any:
    """Event fields as JSON: tuples as lists, records as objects, numpy scalars as numbers,
    NaN and infinity as None."""
    if isinstance(value, ReleaseNote):
        return {
            "mechanism": value.mechanism,
            "noise_std": finite_or_none(value.noise_std),
            "seq": value.seq,
        }
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
