"""What the MLflow UI shows first: the descriptions of the experiment, the run and the model.

MLflow renders a run's or an experiment's ``mlflow.note.content`` tag, and a model version's
description, as Markdown at the top of its page, while tags sit further down (a model version
page shows 5 of its tags before scrolling). So the numbers a reader opens the page for are
written here: the sites, the rounds, the strategy, the final Dice, and each site's privacy
guarantee. Pure text from a run's summary; no MLflow import.

Epsilon is printed rounded *up* (never a smaller number than the ledger's); the exact values are
in the model version's tags and the run's summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from medfed.numbers import finite_or_none
from medfed.privacy.events import PRIVACY_UNIT

NOTE_TAG: Final = "mlflow.note.content"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE (a test checks)
# mlflow.utils.validation.MAX_TAG_VAL_LENGTH is 8000; a note is cut well below it.
MAX_NOTE_LENGTH: Final = 6000
MAX_NAMED_SITES: Final = 10  # in the note's first lines; each site has its own line below

EXPERIMENT_DESCRIPTION: Final = (
    "Federated training of medical image segmentation models with per-patient differential "
    "privacy (medfed: Flower, MONAI, Opacus DP-SGD).\n\n"
    "- One parent run per federation run, its description giving the sites, rounds, strategy, "
    "each site's epsilon and the final Dice; one child run per site under it.\n"
    "- Metrics at step = round: `dice_global`, `train_loss`, `epsilon_max`, `round_seconds`, "
    "`bytes_moved` on the parent; `train_loss`, `dice_before`, `epsilon_spent`, "
    "`epsilon_remaining` on each site's run; `dice_final` on both.\n"
    "- Artifacts of the parent run: the site ledgers, the budget state, plots and the audit "
    "report. The final model is registered as `medfed-<run name>`, each site's privacy "
    "guarantee in the version's description and tags."
)


@dataclass(frozen=True)
class SiteGuarantee:
    """One site's privacy spend as a run's summary states it (the whole ledger's spend)."""

    site: str
    epsilon: float | None  # None: unbounded
    delta: float | None
    accountant: str
    cap: float | None

    def short(self) -> str:
        """``site-a 7.167 of 8``: the spend and the cap."""
        cap = "" if self.cap is None else f" of {self.cap:g}"
        return f"{self.site} {epsilon_text(self.epsilon)}{cap}"

    def line(self) -> str:
        """``site-a: epsilon 7.167 at delta 1e-05 (rdp accountant, cap 8)``."""
        cap = "no cap" if self.cap is None else f"cap {self.cap:g}"
        delta = "?" if self.delta is None else f"{self.delta:g}"
        return (
            f"{self.site}: epsilon {epsilon_text(self.epsilon)} at delta {delta} "
            f"({self.accountant} accountant, {cap})"
        )


def site_guarantees(summary: Mapping[str, Any]) -> list[SiteGuarantee]:
    """Each site of the run that has a privacy budget, in name order.

    Every site whose update was ever aggregated sent signed ledger entries, so has a budget; a
    site that never trained has none and is left out.
    """
    per_site = dict(dict(summary.get("budgets") or {}).get("sites") or {})
    run_sites = {str(site.get("site_id")) for site in summary.get("sites") or []}
    found = []
    for site in sorted(run_sites & set(per_site)):
        budget = dict(per_site[site])
        spent = budget.get("epsilon_spent")
        found.append(
            SiteGuarantee(
                site=site,
                epsilon=None if spent is None else float(spent),
                delta=finite_or_none(budget.get("delta")),
                accountant=str(budget.get("accountant", "unknown")),
                cap=finite_or_none(budget.get("epsilon_cap")),
            )
        )
    return found


def epsilon_text(epsilon: float | None) -> str:
    """Epsilon to 3 decimals, rounded up; ``inf`` when unbounded."""
    if epsilon is None or not math.isfinite(epsilon):
        return "inf"
    return f"{math.ceil(epsilon * 1000 - 1e-9) / 1000:.3f}"


def run_description(
    *,
    run_name: str,
    sites: Sequence[str],
    strategy: str,
    rounds_planned: int,
    status: str,
    reason: str,
    summary: Mapping[str, Any] | None,
) -> str:
    """The parent run's note: what ran and how it ended; then its Dice and each site's epsilon,
    in the two paragraphs the UI shows before "Show more"; then each site's whole guarantee."""
    rounds = f"{rounds_planned} rounds planned"
    if summary is not None:
        rounds = f"{summary.get('rounds_completed', 0)} of {rounds_planned} rounds"
    ended = status if not reason or status == "finished" else f"{status}: {reason}"
    lines = [
        f"Federated training run **{run_name}**: {_count(len(sites), 'site')} "
        f"({_first_names(sites)}), strategy {strategy or 'unknown'}, {rounds}; {ended}.",
    ]
    if summary is None:
        return _cut("\n".join(lines))
    guarantees = site_guarantees(summary)
    spent = _first_names([g.short() for g in guarantees])
    lines += [
        "",
        f"Final Dice **{_dice(summary.get('dice_final'))}** (before training "
        f"{_dice(summary.get('dice_initial'))}); epsilon spent (privacy unit: one {PRIVACY_UNIT}; "
        f"rounded up): {spent}.",
    ]
    if guarantees:
        lines += [
            "",
            "Privacy spent per site (epsilon from each site's signed ledger):",
            "",
            *(f"- {g.line()}" for g in guarantees),
        ]
    if summary.get("model"):
        lines += ["", f"Final model registered as `medfed-{run_name}`."]
    return _cut("\n".join(lines))


def model_version_description(*, summary: Mapping[str, Any], run_name: str) -> str:
    """The registered version's description: the guarantee first, one line per site."""
    lines = [
        f"Privacy guarantee per site (DP-SGD, privacy unit: one {PRIVACY_UNIT}; epsilon is the "
        "site's whole ledger spend, rounded up, an upper bound for this model):",
        "",
        *(f"- {g.line()}" for g in site_guarantees(summary)),
        "",
        f"Global model of federation run {run_name!r} after "
        f"{summary.get('rounds_completed', '?')} rounds; final Dice "
        f"{_dice(summary.get('dice_final'))}.",
    ]
    return _cut("\n".join(lines))


def _first_names(names: Sequence[str]) -> str:
    """The first few names, then how many more."""
    shown = ", ".join(names[:MAX_NAMED_SITES]) or "none"
    more = len(names) - MAX_NAMED_SITES
    return shown if more <= 0 else f"{shown} and {more} more"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _dice(value: Any) -> str:
    number = finite_or_none(value)
    return "not released" if number is None else f"{number:.3f}"


def _cut(text: str) -> str:
    if len(text) <= MAX_NOTE_LENGTH:
        return text
    return text[: MAX_NOTE_LENGTH - 40].rstrip() + "\n\n(cut; see the run's summary.json)"
