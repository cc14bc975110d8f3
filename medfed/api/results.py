"""A federation run's results as pandas tables, read from the events the aggregator recorded.

The run's ``events.jsonl`` (:mod:`medfed.run_events`) is the one source: the in-process runner
and the deployed ServerApp write the same events, and a finished run can be loaded again at any
time with :func:`load_results`. Where the run is in MLflow comes from the run's ``mlflow.json``
(:mod:`medfed.tracking.info`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.errors import ConfigError
from medfed.numbers import as_float
from medfed.run_events import (
    Evaluation,
    ReleaseNote,
    RoundDone,
    RunEnded,
    RunEvent,
    SiteUpdated,
    global_dice,
    read_events,
)
from medfed.workspace import RunPaths, WorkspaceLayout

if TYPE_CHECKING:
    import pandas as pd

HISTORY_COLUMNS = (
    "round",
    "site",
    "loss",
    "dice",
    "epsilon",
    "dice_before",
    "epsilon_cap",
    "patients",
    "loss_release",
    "dice_release",
)
ROUND_COLUMNS = (
    "round",
    "dice_before",
    "loss",
    "sites_answered",
    "sites_asked",
    "seconds",
    "bytes_sent",
    "bytes_received",
)
SITE_COLUMNS = (
    "site",
    "status",
    "rounds",
    "patients",
    "dice",
    "loss",
    "epsilon_spent",
    "epsilon_cap",
    "delta",
    "reason",
)


@dataclass(frozen=True, eq=False)
class FederationResults:
    """What one federation run produced, as tables.

    ``history``: one row per site and round the site trained in, with columns
    ``round, site, loss, dice, epsilon, dice_before, epsilon_cap, patients, loss_release,
    dice_release``. Every number is what the site released, as its ledger records it:
    ``loss`` is the site's mean DP-SGD training loss in that round (noisy: a coordinate of the
    DP-SGD steps); ``dice_before`` is the Dice of the global model the round started from on
    the site's own validation split, and ``dice`` that of the *global* model after the round
    (the next round's ``dice_before``, or the final evaluation after the last round), each
    with Gaussian noise or declared public by the site; ``patients`` is the site's released
    (noisy) training count; ``loss_release`` and ``dice_release`` name the mechanism and its
    noise (``gaussian (std 0.12)``, ``dp-sgd (std 0.3)``, ``public``); ``epsilon`` is the
    epsilon the site had spent after the round (its whole ledger, at its delta).

    ``rounds``: one row per aggregated round (global Dice before it, mean loss, answers, time,
    bytes moved). ``sites``: one row per site at the end (status, rounds, patients, final
    Dice, epsilon spent and cap). ``final_dice`` is the final global model's Dice averaged over
    the sites' validation patients; ``site_dice`` the same per site.
    """

    run_name: str
    workspace: Path
    status: str  # finished, stopped, failed, or running (no last event yet)
    reason: str
    history: pd.DataFrame
    rounds: pd.DataFrame
    sites: pd.DataFrame
    initial_dice: float
    final_dice: float
    site_dice: Mapping[str, float]
    model: Path | None
    mlflow_run_id: str | None
    mlflow_experiment_id: str | None
    tracking_uri: str | None
    events: Sequence[RunEvent] = field(repr=False)

    @property
    def paths(self) -> RunPaths:
        """Where the run's files are."""
        return WorkspaceLayout(root=self.workspace).run(self.run_name)

    @property
    def run_directory(self) -> Path:
        return self.paths.directory

    def dice_table(self) -> pd.DataFrame:
        """Global-model Dice per round (rows) and site (columns), for plotting."""
        return self.history.pivot(index="round", columns="site", values="dice")

    def epsilon_table(self) -> pd.DataFrame:
        """Epsilon spent per round (rows) and site (columns), for plotting."""
        return self.history.pivot(index="round", columns="site", values="epsilon")


def load_results(*, workspace: Path | str, run_name: str) -> FederationResults:
    """The results of run ``run_name`` of ``workspace``, from its recorded events."""
    layout = WorkspaceLayout(root=Path(workspace).expanduser().absolute())
    path = layout.run(run_name).events
    events, _ = read_events(path)
    if not events:
        runs = [name for name in layout.run_names() if layout.run(name).events.is_file()]
        raise ConfigError(
            f"no events of run {run_name!r} in {path.parent}",
            hint=f"runs of this workspace: {', '.join(runs) or 'none'}",
        )
    return results_from_events(events, workspace=layout.root, run_name=run_name)


def results_from_events(
    events: Iterable[RunEvent], *, workspace: Path, run_name: str
) -> FederationResults:
    """Build the tables from a run's events (in the order they were written).

    A resumed run's file holds every attempt: a round that was trained twice counts with its
    last attempt.
    """
    import pandas as pd

    from medfed.tracking.info import read_tracking_info

    records = tuple(events)
    updates: dict[tuple[int, str], SiteUpdated] = {}
    rounds: dict[int, RoundDone] = {}
    final: dict[str, float] = {}
    final_dice = math.nan
    terminal: RunEnded | None = None
    for event in records:
        if isinstance(event, SiteUpdated):
            updates[(event.round, event.site)] = event
        elif isinstance(event, RoundDone):
            rounds[event.round] = event
        elif isinstance(event, Evaluation):
            final = {site: _number(dice) for site, dice in event.sites.items()}
            final_dice = _number(event.dice)
        elif isinstance(event, RunEnded):
            terminal = event
    after = global_dice(records)

    history_rows = [
        {
            "round": round_index,
            "site": site,
            "loss": _number(event.loss),
            "dice": after.sites.get(site, {}).get(round_index, math.nan),
            "epsilon": _number(event.epsilon_spent),
            "dice_before": _number(event.dice_before),
            "epsilon_cap": _number(event.epsilon_cap),
            "patients": event.patients,
            "loss_release": _describe(event.releases.get("loss")),
            "dice_release": _describe(after.releases.get(site, {}).get(round_index)),
        }
        for (round_index, site), event in sorted(updates.items())
    ]
    round_rows = [
        {
            "round": index,
            "dice_before": _number(event.dice_before),
            "loss": _number(event.loss),
            "sites_answered": event.sites_answered,
            "sites_asked": event.sites_asked,
            "seconds": _number(event.seconds),
            "bytes_sent": event.bytes_sent,
            "bytes_received": event.bytes_received,
        }
        for index, event in sorted(rounds.items())
    ]
    summary: Mapping[str, Any] = (terminal.summary if terminal else None) or {}
    site_rows = [
        {
            "site": str(site.get("site_id")),
            "status": str(site.get("status", "")),
            "rounds": int(site.get("rounds") or 0),
            "patients": int(site.get("patients") or 0),
            "dice": _number(site.get("dice")),
            "loss": _number(site.get("loss")),
            "epsilon_spent": _number(site.get("epsilon_spent")),
            "epsilon_cap": _number(site.get("epsilon_cap")),
            "delta": _number(site.get("delta")),
            "reason": str(site.get("reason") or ""),
        }
        for site in summary.get("sites") or []
    ]
    paths = WorkspaceLayout(root=Path(workspace)).run(run_name)
    info = read_tracking_info(paths=paths)
    model = summary.get("model")
    return FederationResults(
        run_name=run_name,
        workspace=Path(workspace),
        status="running" if terminal is None else terminal.status,
        reason="" if terminal is None else terminal.reason,
        history=pd.DataFrame(history_rows, columns=list(HISTORY_COLUMNS)),
        rounds=pd.DataFrame(round_rows, columns=list(ROUND_COLUMNS)),
        sites=pd.DataFrame(site_rows, columns=list(SITE_COLUMNS)),
        initial_dice=_number(summary.get("dice_initial")),
        final_dice=final_dice,
        site_dice=final,
        model=None if not model else Path(str(model)),
        mlflow_run_id=None if info is None else info.parent_run_id,
        mlflow_experiment_id=None if info is None else info.experiment_id,
        tracking_uri=None if info is None else info.tracking_uri,
        events=records,
    )


def _describe(release: ReleaseNote | None) -> str:
    """A release as a table cell: ``gaussian (std 0.12)``, ``public``; "" when none."""
    return "" if release is None else release.describe()


def _number(value: Any) -> float:
    """Events hold a missing number as None; tables want NaN."""
    number = as_float(value)
    return math.nan if number is None else number
