"""Per-round plots of a federation run (PNG, matplotlib's Agg canvas, no pyplot state).

Built from the run's events, so a run resumed in a new aggregator process is plotted whole.
``dice.png``: the validation Dice of each global model, per site and weighted over the sites,
against the round after which that model was made (:func:`medfed.run_events.global_dice`).
``epsilon.png``: each site's epsilon spent after each round, with its cap as a dashed line of
the same colour. Above :data:`MAX_SITE_LINES` sites a line per site is unreadable (and its
legend larger than the plot): the plots show the sites' median and range per round instead,
and the distinct caps.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.run_events import RunEvent, SiteUpdated, global_dice, of_kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DICE_PLOT = "dice.png"
EPSILON_PLOT = "epsilon.png"
# Up to this many sites each has a line of its own; more draw the sites' spread per round.
MAX_SITE_LINES = 10


@dataclass(frozen=True)
class RunSeries:
    """The numbers the plots show, keyed by site and by round."""

    dice_sites: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    dice_global: Mapping[int, float] = field(default_factory=dict)
    epsilon_sites: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    caps: Mapping[str, float] = field(default_factory=dict)


def series_from_events(events: Iterable[RunEvent]) -> RunSeries:
    """Collect the plotted values from a run's events (a later value for a round wins)."""
    events = list(events)
    epsilon: dict[str, dict[int, float]] = {}
    caps: dict[str, float] = {}
    for event in of_kind(events, SiteUpdated):
        if event.epsilon_spent is not None:
            epsilon.setdefault(event.site, {})[event.round] = event.epsilon_spent
        if event.epsilon_cap is not None:
            caps[event.site] = event.epsilon_cap
    dice = global_dice(events)
    return RunSeries(
        dice_sites=dice.sites, dice_global=dice.overall, epsilon_sites=epsilon, caps=caps
    )


def write_plots(*, series: RunSeries, directory: Path, title: str = "") -> list[Path]:
    """Write ``dice.png`` and ``epsilon.png`` into ``directory``; the files written."""
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    if len(series.dice_sites) > MAX_SITE_LINES:
        _spread(axes, series.dice_sites, colour="C0")
    else:
        for site, values in sorted(series.dice_sites.items()):
            rounds = sorted(values)
            axes.plot(rounds, [values[r] for r in rounds], marker="o", label=site)
    if series.dice_global:
        rounds = sorted(series.dice_global)
        axes.plot(
            rounds,
            [series.dice_global[r] for r in rounds],
            marker="s",
            color="black",
            linewidth=2,
            label="weighted",
        )
    axes.set_xlabel("round (global model after it)")
    axes.set_ylabel("validation Dice")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(f"{title}: Dice per site" if title else "Dice per site")
    axes.grid(alpha=0.3)
    if series.dice_sites or series.dice_global:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = directory / DICE_PLOT
    figure.savefig(path, format="png")
    written.append(path)

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    sites = sorted(set(series.epsilon_sites) | set(series.caps))
    if len(sites) > MAX_SITE_LINES:
        _spread(axes, series.epsilon_sites, colour="C0")
        for cap in sorted(set(series.caps.values()))[:MAX_SITE_LINES]:
            axes.axhline(cap, color="#a31515", linestyle="--", linewidth=1)
        sites = []
    for index, site in enumerate(sites):
        colour = colours[index % len(colours)]
        values = series.epsilon_sites.get(site, {})
        rounds = sorted(values)
        axes.plot(rounds, [values[r] for r in rounds], marker="o", color=colour, label=site)
        if site in series.caps:
            axes.axhline(series.caps[site], color=colour, linestyle="--", linewidth=1)
    axes.set_xlabel("round")
    axes.set_ylabel("epsilon spent (dashed: cap)")
    axes.set_ylim(bottom=0.0)
    axes.set_title(f"{title}: privacy spent" if title else "privacy spent")
    axes.grid(alpha=0.3)
    if series.epsilon_sites:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = directory / EPSILON_PLOT
    figure.savefig(path, format="png")
    written.append(path)
    return written


def _spread(axes: Axes, per_site: Mapping[str, Mapping[int, float]], *, colour: str) -> None:
    """The sites' median per round, and their range as a band around it."""
    by_round: dict[int, list[float]] = {}
    for values in per_site.values():
        for round_, value in values.items():
            by_round.setdefault(round_, []).append(value)
    rounds = sorted(by_round)
    if not rounds:
        return
    low = [min(by_round[r]) for r in rounds]
    high = [max(by_round[r]) for r in rounds]
    axes.fill_between(
        rounds, low, high, color=colour, alpha=0.25, label=f"{len(per_site)} sites: range"
    )
    axes.plot(
        rounds,
        [statistics.median(by_round[r]) for r in rounds],
        marker="o",
        color=colour,
        label=f"{len(per_site)} sites: median",
    )
