"""How a federation's events read on a terminal: one line per event, a table at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from medfed.api.progress import event_line as event_line
from medfed.api.progress import number_text


def summary_table(summary: Mapping[str, Any]) -> Table:
    table = Table(title=f"run {summary['run_name']}: {summary['status']}")
    for column in ("site", "status", "rounds", "patients", "Dice", "epsilon spent / cap", "note"):
        table.add_column(column)
    for site in summary["sites"]:
        table.add_row(
            site["site_id"],
            site["status"],
            str(site["rounds"]),
            str(site["patients"]),
            number_text(site["dice"]),
            f"{number_text(site['epsilon_spent'], 2)} / {number_text(site['epsilon_cap'], 2)}",
            site.get("reason") or "",
        )
    return table


def print_summary(console: Console, summary: Mapping[str, Any]) -> None:
    console.print(summary_table(summary))
    console.print(
        f"global Dice: {number_text(summary.get('dice_initial'))} before training, "
        f"{number_text(summary.get('dice_final'))} after {summary['rounds_completed']} rounds "
        f"(delta {summary['sites'][0].get('delta') if summary['sites'] else 'n/a'})"
    )
    if summary.get("model"):
        console.print(f"global model: {summary['model']}")
