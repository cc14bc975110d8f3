"""How a finished federation reads on a terminal: a table of the sites, the global Dice, where
the model is. Every line is printed as it is, never wrapped inside a path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from medfed.api.progress import event_line as event_line
from medfed.api.progress import number_text
from medfed.api.site_board import FINAL_STATES
from medfed.cli.live import say


def site_state(site: Mapping[str, Any], *, run_status: str, noted: str = "") -> str:
    """A site's state at the end of a run, as people read it (``done``, ``budget spent``...)."""
    status = str(site.get("status"))
    state = FINAL_STATES.get(status, status)
    if state == "done" and run_status != "finished":
        return "stopped"
    if state == "offline" and noted.startswith("no reply"):
        return "timed out"
    return state


def summary_table(summary: Mapping[str, Any], *, notes: Mapping[str, str] | None = None) -> Table:
    """One row per site; the ``note`` column only when a site has something to say.

    ``notes``: what the run's events said of each site (a decline with its code, a timeout, a
    spent budget, a privacy alert); a site without one shows the aggregator's last reason.
    """
    notes = notes or {}
    sites = summary["sites"]
    noted = {s["site_id"]: notes.get(s["site_id"]) or s.get("reason") or "" for s in sites}
    table = Table(title=Text(f"run {summary['run_name']}: {summary['status']}"))
    columns = ["site", "state", "rounds", "patients", "Dice", "epsilon spent / cap"]
    if any(noted.values()):
        columns.append("note")
    for column in columns:
        table.add_column(column, overflow="fold")
    for site in sites:
        site_id = site["site_id"]
        cells = [
            site_id,
            site_state(site, run_status=str(summary["status"]), noted=noted[site_id]),
            str(site["rounds"]),
            # under secure aggregation the counts are in the sums only
            "n/a" if summary.get("secure_aggregation") else str(site["patients"]),
            number_text(site["dice"]),
            f"{number_text(site['epsilon_spent'], 2)} / {number_text(site['epsilon_cap'], 2)}",
            noted[site_id],
        ]
        table.add_row(*(Text(cell) for cell in cells[: len(columns)]))
    return table


def print_summary(
    console: Console, summary: Mapping[str, Any], *, notes: Mapping[str, str] | None = None
) -> None:
    console.print(summary_table(summary, notes=notes))
    delta = summary["sites"][0].get("delta") if summary["sites"] else "n/a"
    say(
        console,
        f"global Dice: {number_text(summary.get('dice_initial'))} before training, "
        f"{number_text(summary.get('dice_final'))} after {summary['rounds_completed']} rounds "
        f"(delta {delta})",
    )
    site_level = summary.get("site_level_privacy")
    if site_level:
        say(
            console,
            f"site-level epsilon (central DP at the aggregator; the unit is a whole site, not "
            f"a patient, and it is not comparable with the column above): "
            f"{number_text(site_level.get('site_level_epsilon'), 2)} at delta "
            f"{site_level.get('delta')} over {site_level.get('releases')} rounds",
        )
    if summary.get("model"):
        say(console, f"global model: {summary['model']}")
