"""The audit report's plots: a site's epsilon over rounds and Dice against epsilon; and, for a
large federation, one histogram of every site's spend against its cap.

Drawn with matplotlib (imported only here, when a plot is drawn); the HTML page embeds them as
inline SVG, the PDF as PNG. matplotlib comes with MLflow (``medfed[tracking]``); without it the
report leaves the plots out and says so.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from medfed.audit.findings import fmt
from medfed.audit.statement import SiteStatement

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NO_PLOTS: Final = "Plots left out: matplotlib is not installed (pip install 'medfed[tracking]')."
PNG_DPI: Final = 200
SHARE_AXIS_END: Final = 1.5  # the federation's histogram: shares of the cap up to this


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def epsilon_figure(site: SiteStatement) -> Figure | None:
    """Epsilon after each reserved round (cumulative over the whole ledger) and the cap."""
    if not site.rounds:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.4))
    axes = figure.subplots()
    xs = list(range(1, len(site.rounds) + 1))
    ys = [r.epsilon_after if math.isfinite(r.epsilon_after) else math.nan for r in site.rounds]
    labels = [f"{r.reservation.run_id}/{r.reservation.round}" for r in site.rounds]
    axes.plot(xs, ys, marker="o", label="epsilon (Opacus RDP, all charges to this round)")
    if site.cap is not None:
        axes.axhline(site.cap, color="#a31515", linestyle="--", label=f"cap {site.cap:g}")
    axes.set_xticks(xs, labels, rotation=45, fontsize=7)
    axes.set_xlabel("run/round (ledger order)")
    axes.set_ylabel(f"epsilon at delta {fmt(site.delta)}")
    axes.set_ylim(bottom=0)
    axes.set_title(f"site {site.site_id}: epsilon over rounds")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def dice_figure(site: SiteStatement) -> Figure | None:
    """Released Dice of each round's global model against the epsilon reported after it."""
    points = [
        (p["epsilon_spent"], p["dice_before"], f"{p['run_name']}/{p['round']}")
        for p in site.dice
        if isinstance(p.get("epsilon_spent"), int | float)
        and isinstance(p.get("dice_before"), int | float)
    ]
    if not points:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.4))
    axes = figure.subplots()
    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    for x, y, label in points:
        axes.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axes.set_xlabel("epsilon spent")
    axes.set_ylabel("released Dice of the global model")
    axes.set_title(f"site {site.site_id}: Dice against epsilon")
    figure.tight_layout()
    return figure


def svg_of(figure: Figure) -> str:
    """The figure as an ``<svg>`` element with its text as text (searchable, no font files)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "medfed-audit"}):
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.find("<svg") :]


def png_of(figure: Figure, *, dpi: int = PNG_DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def spent_figure(sites: Sequence[SiteStatement]) -> Figure | None:
    """How many sites spent what share of their cap: one histogram for the whole federation."""
    shares = [
        min(site.spent / site.cap, SHARE_AXIS_END)
        for site in sites
        if site.verified
        and site.spent is not None
        and site.cap is not None
        and site.cap > 0
        and math.isfinite(site.spent)
    ]
    if not shares:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.4))
    axes = figure.subplots()
    axes.hist(shares, bins=40, range=(0.0, SHARE_AXIS_END), color="#3b6ea5")
    axes.axvline(1.0, color="#a31515", linestyle="--", label="the cap")
    axes.set_xlabel(f"epsilon spent / cap (above {SHARE_AXIS_END:g} drawn at {SHARE_AXIS_END:g})")
    axes.set_ylabel("sites")
    axes.set_title(f"{len(shares)} sites: epsilon spent as a share of the cap")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure
