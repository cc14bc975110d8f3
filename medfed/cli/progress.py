"""How a federation's events read on a terminal: one line per event, a table at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def _how(releases: Mapping[str, Any], name: str) -> str:
    """`` [gaussian]`` beside a released number; nothing when it was not released."""
    release = releases.get(name)
    return f" [{release.get('mechanism')}]" if isinstance(release, Mapping) else ""


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def event_line(event: Mapping[str, Any]) -> str | None:
    """The line to print for ``event``, or None for events that need none."""
    kind = event.get("event")
    site = event.get("site", "")
    match kind:
        case "run_started":
            resumed = event.get("resume_from")
            start = "" if resumed is None else f" (resuming after round {resumed})"
            sites = ", ".join(event["sites"])
            return f"run {event['run_name']}: {event['rounds']} rounds, sites {sites}{start}"
        case "sites_online":
            missing = event.get("missing") or []
            return f"sites online: {', '.join(event['online']) or 'none'}" + (
                f"; missing: {', '.join(missing)}" if missing else ""
            )
        case "model_initialised":
            return f"initial model from {site} ({event['parameters']} parameters)"
        case "round_started":
            return f"round {event['round']}: training at {', '.join(event['sites'])}"
        case "site_update":
            releases = event.get("releases") or {}
            return (
                f"  {site}: {event['patients']} patients{_how(releases, 'patients')}, loss "
                f"{_num(event['loss'])}{_how(releases, 'loss')}, Dice of the global model "
                f"{_num(event['dice_before'])}{_how(releases, 'dice_before')}, "
                f"epsilon {_num(event['epsilon_spent'], 2)} / {_num(event['epsilon_cap'], 2)}"
            )
        case "privacy_alert":
            return f"  PRIVACY ALERT {site}: {event['alert']}"
        case "site_declined":
            return f"  {site} declined round {event['round']} [{event['code']}]: {event['reason']}"
        case "site_rejected":
            return f"  {site}: update rejected: {'; '.join(event['reasons'])}"
        case "site_timeout":
            return f"  {site}: no reply (round {event['round']})"
        case "site_exhausted":
            return f"  {site}: not asked any more: {event['reason']}"
        case "round_done":
            return (
                f"round {event['round']} done: {event['sites_answered']}/{event['sites_asked']} "
                f"sites, global Dice before the round {_num(event['dice_before'])}, "
                f"{_num(event['seconds'], 1)} s"
            )
        case "evaluation":
            per_site = ", ".join(f"{k} {_num(v)}" for k, v in sorted(event["sites"].items()))
            return f"final evaluation: Dice {_num(event['dice'])} ({per_site})"
        case "evaluation_failed":
            return f"  {site}: evaluation failed: {event['reason']}"
        case "run_failed":
            return f"run failed: {event['reason']}"
        case "run_finished" | "run_stopped":
            return f"run {event['status']}: {event['reason']}"
    return None


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
            _num(site["dice"]),
            f"{_num(site['epsilon_spent'], 2)} / {_num(site['epsilon_cap'], 2)}",
            site.get("reason") or "",
        )
    return table


def print_summary(console: Console, summary: Mapping[str, Any]) -> None:
    console.print(summary_table(summary))
    console.print(
        f"global Dice: {_num(summary.get('dice_initial'))} before training, "
        f"{_num(summary.get('dice_final'))} after {summary['rounds_completed']} rounds "
        f"(delta {summary['sites'][0].get('delta') if summary['sites'] else 'n/a'})"
    )
    if summary.get("model"):
        console.print(f"global model: {summary['model']}")
