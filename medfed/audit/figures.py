"""The audit report's plots of one site's statement: epsilon over rounds, Dice against epsilon.

Drawn with matplotlib (imported only here, when a plot is drawn) as figures for the PDF and as
inline SVG for the HTML page.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from medfed.audit.findings import fmt
from medfed.audit.statement import SiteStatement

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def epsilon_svg(site: SiteStatement) -> str | None:
    return _svg(epsilon_figure(site))


def dice_svg(site: SiteStatement) -> str | None:
    return _svg(dice_figure(site))


def _svg(figure: Figure | None) -> str | None:
    if figure is None:
        return None
    buffer = io.StringIO()
    with _plain_svg():
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.find("<svg") :]


@contextlib.contextmanager
def _plain_svg() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "medfed-audit"}):
        yield
