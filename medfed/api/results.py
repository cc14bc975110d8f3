"""A federation run's results as pandas tables, read from the events the aggregator recorded.

The run store's ``events.jsonl`` (:mod:`medfed.aggregator.run_store`) is the one source: the
in-process runner and the deployed ServerApp write the same events, and a finished run can be
loaded again at any time with :func:`load_results`. Where the run is in MLflow comes from the
run's ``mlflow.json`` (:mod:`medfed.tracking.info`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.errors import ConfigError

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
_STATUS = {"run_finished": "finished", "run_stopped": "stopped", "run_failed": "failed"}


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
    tracking_uri: str | None
    events: Sequence[Mapping[str, Any]] = field(repr=False)

    @property
    def run_directory(self) -> Path:
        from medfed.aggregator.run_store import run_directory

        return run_directory(self.workspace, self.run_name)

    def dice_table(self) -> pd.DataFrame:
        """Global-model Dice per round (rows) and site (columns), for plotting."""
        return self.history.pivot(index="round", columns="site", values="dice")

    def epsilon_table(self) -> pd.DataFrame:
        """Epsilon spent per round (rows) and site (columns), for plotting."""
        return self.history.pivot(index="round", columns="site", values="epsilon")


def load_results(*, workspace: Path | str, run_name: str) -> FederationResults:
    """The results of run ``run_name`` of ``workspace``, from its recorded events."""
    from medfed.aggregator.run_store import EVENTS_FILE, read_events, run_directory

    root = Path(workspace).expanduser().absolute()
    path = run_directory(root, run_name) / EVENTS_FILE
    events, _ = read_events(path)
    if not events:
        runs = sorted(p.parent.name for p in (root / "runs").glob(f"*/{EVENTS_FILE}"))
        raise ConfigError(
            f"no events of run {run_name!r} in {path.parent}",
            hint=f"runs of this workspace: {', '.join(runs) or 'none'}",
        )
    return results_from_events(events, workspace=root, run_name=run_name)


def results_from_events(
    events: Iterable[Mapping[str, Any]], *, workspace: Path, run_name: str
) -> FederationResults:
    """Build the tables from a run's events (in the order they were written).

    A resumed run's file holds every attempt: a round that was trained twice counts with its
    last attempt.
    """
    import pandas as pd

    from medfed.aggregator.run_store import run_directory
    from medfed.tracking.info import read_tracking_info

    records = [dict(e) for e in events]
    updates: dict[tuple[int, str], dict[str, Any]] = {}
    rounds: dict[int, dict[str, Any]] = {}
    final: dict[str, float] = {}
    final_releases: dict[str, Any] = {}
    final_dice = math.nan
    terminal: Mapping[str, Any] | None = None
    for event in records:
        kind = event.get("event")
        if kind == "site_update":
            updates[(int(event["round"]), str(event["site"]))] = event
        elif kind == "round_done":
            rounds[int(event["round"])] = event
        elif kind == "evaluation":
            final = {str(s): _number(d) for s, d in dict(event.get("sites") or {}).items()}
            final_releases = dict(event.get("releases") or {})
            final_dice = _number(event.get("dice"))
        elif kind in _STATUS:
            terminal = event

    history_rows = []
    for (round_index, site), event in sorted(updates.items()):
        following = updates.get((round_index + 1, site))
        if following is not None:
            dice = _number(following.get("dice_before"))
            dice_release = _release(following, "dice_before")
        elif round_index == max(rounds, default=0):
            dice = final.get(site, math.nan)
            dice_release = _describe(final_releases.get(site))
        else:
            dice, dice_release = math.nan, ""
        history_rows.append(
            {
                "round": round_index,
                "site": site,
                "loss": _number(event.get("loss")),
                "dice": dice,
                "epsilon": _number(event.get("epsilon_spent")),
                "dice_before": _number(event.get("dice_before")),
                "epsilon_cap": _number(event.get("epsilon_cap")),
                "patients": int(event.get("patients") or 0),
                "loss_release": _release(event, "loss"),
                "dice_release": dice_release,
            }
        )
    round_rows = [
        {
            "round": index,
            "dice_before": _number(event.get("dice_before")),
            "loss": _number(event.get("loss")),
            "sites_answered": int(event.get("sites_answered") or 0),
            "sites_asked": int(event.get("sites_asked") or 0),
            "seconds": _number(event.get("seconds")),
            "bytes_sent": int(event.get("bytes_sent") or 0),
            "bytes_received": int(event.get("bytes_received") or 0),
        }
        for index, event in sorted(rounds.items())
    ]
    summary: Mapping[str, Any] = (terminal or {}).get("summary") or {}
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
    run_dir = run_directory(workspace, run_name)
    info = read_tracking_info(run_dir=run_dir)
    model = summary.get("model")
    return FederationResults(
        run_name=run_name,
        workspace=Path(workspace),
        status="running" if terminal is None else _STATUS[str(terminal["event"])],
        reason="" if terminal is None else str(terminal.get("reason") or ""),
        history=pd.DataFrame(history_rows, columns=list(HISTORY_COLUMNS)),
        rounds=pd.DataFrame(round_rows, columns=list(ROUND_COLUMNS)),
        sites=pd.DataFrame(site_rows, columns=list(SITE_COLUMNS)),
        initial_dice=_number(summary.get("dice_initial")),
        final_dice=final_dice,
        site_dice=final,
        model=None if not model else Path(str(model)),
        mlflow_run_id=None if info is None else info.parent_run_id,
        tracking_uri=None if info is None else info.tracking_uri,
        events=tuple(records),
    )


def _release(event: Mapping[str, Any], name: str) -> str:
    return _describe(dict(event.get("releases") or {}).get(name))


def _describe(release: Any) -> str:
    """A release as a table cell: ``gaussian (std 0.12)``, ``public``; "" when none."""
    if not isinstance(release, Mapping):
        return ""
    mechanism = str(release.get("mechanism", ""))
    std = release.get("noise_std")
    if isinstance(std, int | float) and not isinstance(std, bool) and math.isfinite(std):
        return f"{mechanism} (std {std:.3g})"
    return mechanism


def _number(value: Any) -> float:
    """Events write NaN as null; tables want NaN back."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)
