"""Per-round plots of a federation run (PNG, matplotlib's Agg canvas, no pyplot state).

Built from the run's events, so a run resumed in a new aggregator process is plotted whole.
``dice.png``: the validation Dice of each global model, per site and weighted over the sites,
against the round after which that model was made (:func:`medfed.run_events.global_dice`).
``epsilon.png``: each site's epsilon spent after each round, with its cap as a dashed line of
the same colour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medfed.run_events import RunEvent, SiteUpdated, global_dice, of_kind

DICE_PLOT = "dice.png"
EPSILON_PLOT = "epsilon.png"


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
    for index, site in enumerate(sorted(set(series.epsilon_sites) | set(series.caps))):
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
