"""`medfed privacy ...` commands: epsilon of a DP-SGD run, and the state of a site's ledger.

Accounting libraries are imported only when an epsilon is computed, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.numbers import finite_or_none
from medfed.privacy.accounting import AccountantName, check_accountant

app = typer.Typer(help="Privacy accounting and the site's privacy ledger.", no_args_is_help=True)

_COMPARED: tuple[AccountantName, ...] = ("rdp", "prv", "pld", "rdp-classic")

AccountantOption = Annotated[
    AccountantName,
    typer.Option(
        "--accountant",
        help="rdp (improved conversion), rdp-classic (older papers), prv (Opacus), pld "
        "(dp-accounting).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@app.command()
def epsilon(
    sample_rate: Annotated[
        float, typer.Option("--sample-rate", help="Poisson sampling rate q (batch / patients).")
    ],
    noise_multiplier: Annotated[
        float, typer.Option("--noise-multiplier", help="Noise multiplier sigma.")
    ],
    steps: Annotated[int, typer.Option("--steps", help="Number of DP-SGD steps.")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta.")],
    accountant: AccountantOption = "rdp",
    as_json: JsonOption = False,
) -> None:
    """Epsilon of STEPS Poisson-subsampled Gaussian steps at DELTA."""
    from medfed.privacy.accounting import DPSteps, compute_epsilon, conversion_of

    name = check_accountant(accountant)
    history = [DPSteps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)]
    value = compute_epsilon(history=history, delta=delta, accountant=name)
    if as_json:
        result = {
            "epsilon": finite_or_none(value),
            "accountant": name,
            "conversion": conversion_of(name),
            "delta": delta,
            "sample_rate": sample_rate,
            "noise_multiplier": noise_multiplier,
            "steps": steps,
        }
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"epsilon = {value:.4f} at delta = {delta:g} ({steps} steps, sample rate {sample_rate:g}, "
        f"noise multiplier {noise_multiplier:g}; {conversion_of(name)})"
    )


@app.command()
def plan(
    patients: Annotated[
        int, typer.Option("--patients", help="Training patients at the smallest site.")
    ],
    sites: Annotated[int, typer.Option("--sites", help="Sites in the federation.")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="Epsilon cap per site.")],
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Rounds (default: the preset's).")
    ] = None,
    delta: Annotated[float, typer.Option("--delta", help="Delta.")] = 1e-5,
    accountant: AccountantOption = "rdp",
    as_json: JsonOption = False,
) -> None:
    """Recommend a training recipe for a federation's size and per-site epsilon cap."""
    from medfed.api.planner import recommend_recipe

    recipe = recommend_recipe(
        patients_per_site=patients,
        sites=sites,
        target_epsilon=epsilon,
        rounds=rounds,
        delta=delta,
        accountant=check_accountant(accountant),
    )
    summary = recipe.to_json()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    for line in _recipe_lines(summary):
        typer.echo(line)


def _recipe_lines(recipe: dict[str, Any]) -> list[str]:
    sites, patients = recipe["sites"], recipe["patients_per_site"]
    site_settings = ", ".join(f"{k}: {v}" for k, v in recipe["site_settings"].items())
    lines = [
        f"recipe for {sites} sites with {patients} training patients at the smallest, epsilon "
        f"{recipe['target_epsilon']:g} per site at delta {recipe['delta']:g} "
        f"({recipe['accountant']}):",
        f"  preset            {recipe['preset']} (run settings: strategy: {{preset: "
        f"{recipe['preset']}}})",
        f"  noise multiplier  {recipe['noise_multiplier']:.4f} (spends epsilon "
        f"{recipe['epsilon']:.3f} at the smallest site)",
        f"  sample rate       {recipe['sample_rate']:g} (batch {recipe['batch_size']}: every "
        "training patient in every step)",
        f"  rounds            {recipe['rounds']}",
        f"  local steps       {recipe['steps_per_round']} per round (local_epochs "
        f"{recipe['local_epochs']})",
        f"  each site sets    {site_settings}",
    ]
    estimate = recipe["expected_dice_ratio"]
    if estimate is None:
        lines.append("  expected Dice ratio: no measurement of this recipe")
    else:
        lines += [
            f"  expected Dice ratio (ESTIMATE, federated DP / centralised non-private): "
            f"{estimate['estimate']:.2f} (measured {estimate['low']:.2f}-{estimate['high']:.2f})",
            f"    {estimate['note']}; measured at {estimate['measured_at']}",
            f"    source: {estimate['source']}",
        ]
    return lines


@app.command()
def witness(
    config: Annotated[Path, typer.Option("--config", help="The site's site.yaml.")],
) -> None:
    """Record the verified ledger's head in the site's head witness (paths.head_witness)."""
    from medfed.config import load_site_config
    from medfed.site.ledger_of import ledger_of

    ledger = ledger_of(load_site_config(config))
    # verified against its own head only: this is the step that (re)creates the witness
    recorded = ledger.record_witness()
    assert ledger.witness is not None
    typer.echo(f"recorded the head of {len(recorded.entries)} entries in {ledger.witness.path}")


@app.command()
def ledger(
    config: Annotated[Path, typer.Option("--config", help="The site's site.yaml.")],
    as_json: JsonOption = False,
) -> None:
    """Verify the site's privacy ledger and show the epsilon it has spent."""
    from medfed.config import load_site_config
    from medfed.privacy.accounting import compute_epsilon, conversion_of
    from medfed.privacy.budget import BudgetStatus
    from medfed.privacy.distributed_noise import RDP_ACCOUNTANTS
    from medfed.site.ledger_of import ledger_of
    from medfed.site.release import opened

    site = load_site_config(config)
    report = ledger_of(site).verify()
    # The ledger's own terms once it has them: what the site's spend is kept under.
    terms = report.terms or site.terms
    cap = terms.cap
    accountant: AccountantName = terms.accountant
    names = [accountant, *(name for name in _COMPARED if name != accountant)]
    if report.has_distributed:
        # distributed-noise steps are charged at Gaussian equivalents that bound RDP only
        names = [name for name in names if name in RDP_ACCOUNTANTS]
    by_accountant = {
        name: compute_epsilon(history=report.history, delta=cap.delta, accountant=name)
        for name in names
    }
    status = BudgetStatus(spent=by_accountant[accountant], cap=cap, accountant=accountant)
    sealed = [entry for entry in report.releases if entry.sealed is not None]
    summary: dict[str, Any] = {
        "site_id": site.site_id,
        "ledger": str(report.path),
        "status": "verified" if report.entries else "empty",
        "verified": True,
        "head_lagging": report.head_lagging,
        "entries": len(report.entries),
        "rounds": len(report.reservations),
        "releases": len(report.releases),
        # sealed releases (secure aggregation): their kept values must open their commitments
        "sealed_releases": len(sealed),
        "sealed_opened": sum(opened(site, entry) is not None for entry in sealed),
        "terms_in_ledger": report.terms is not None,
        "open_reservations": len(report.open_reservations),
        "key_id": report.key_id,
        "accountant": accountant,
        "conversion": conversion_of(accountant),
        "delta": cap.delta,
        "spent": finite_or_none(status.spent),
        "cap": cap.epsilon,
        "remaining": status.remaining,
        "exhausted": status.exhausted,
        "epsilon_by_accountant": {
            name: finite_or_none(value) for name, value in by_accountant.items()
        },
    }
    plans = report.distributed_plans
    if plans:
        views = report.view_epsilons(delta=cap.delta, accountant=accountant)
        summary["distributed_noise"] = {
            "rounds": len(plans),
            "sites": sorted({plan.sites for plan in plans.values()}),
            "distributed": finite_or_none(views["distributed"]),
            "local": finite_or_none(views["local"]),
            "budget_enforced_on": report.budget_view,
        }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    _print_summary(summary, by_accountant)


def _released(summary: dict[str, Any]) -> str:
    text = str(summary["releases"])
    sealed, kept = summary["sealed_releases"], summary["sealed_opened"]
    if sealed:
        text += f" ({sealed} sealed, {kept} opened by the values kept at the site"
        if kept < sealed:
            text += ": restore workdir/releases/sealed.json from backup"
        text += ")"
    return text


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.4f}"


def _print_summary(summary: dict[str, Any], by_accountant: dict[AccountantName, float]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from medfed.privacy.accounting import conversion_of

    status = summary["status"]
    if summary["head_lagging"]:
        status += " (head one entry behind: repaired at the next append)"
    rows = [
        ("ledger", summary["ledger"]),
        ("status", status),
        ("entries / rounds", f"{summary['entries']} / {summary['rounds']}"),
        ("open reservations (counted in full)", str(summary["open_reservations"])),
        ("signing key id", summary["key_id"] or "(none yet)"),
        (f"spent ({summary['accountant']})", f"{by_accountant[summary['accountant']]:.4f}"),
        ("conversion", summary["conversion"]),
        (
            "cap",
            f"{summary['cap']:g} at delta {summary['delta']:g}"
            + ("" if summary["terms_in_ledger"] else " (from the config: no terms entry yet)"),
        ),
        ("released numbers", _released(summary)),
        ("remaining", f"{summary['remaining']:.4f}"),
    ]
    shared = summary.get("distributed_noise")
    if shared is not None:
        rows += [
            (
                f"distributed epsilon ({' or '.join(map(str, shared['sites']))} sites' shares "
                "and secure aggregation hold)",
                _number(shared["distributed"]),
            ),
            ("local epsilon (own noise alone)", _number(shared["local"])),
            ("the cap holds on", f"the {shared['budget_enforced_on']} epsilon"),
        ]
    rows += [
        (f"for comparison: {name}", f"{value:.4f}  ({conversion_of(name)})")
        for name, value in by_accountant.items()
        if name != summary["accountant"]
    ]
    table = Table(title=Text(f"privacy ledger of site {summary['site_id']}"), show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for item, value in rows:
        # Text, not markup: paths and ids must print as they are.
        table.add_row(Text(item), Text(value))
    Console().print(table)
