"""Rendering an audit report's statements (:mod:`medfed.audit.statement`): self-contained HTML,
and PDF.

Plots are drawn with matplotlib when it can be imported (it comes with MLflow, so with
``medfed[tracking]``) and embedded as inline SVG; without it the HTML says that the plots were
left out. Every value shown is escaped. The PDF (matplotlib's ``PdfPages``) holds the same
text and plots, one site per page or more.
"""

from __future__ import annotations

import html
import importlib.util
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from medfed.audit.accounting import ACCOUNTANT_DESCRIPTIONS
from medfed.audit.figures import dice_figure, dice_svg, epsilon_figure, epsilon_svg
from medfed.audit.findings import fmt
from medfed.audit.statement import (
    ADJACENCY,
    MECHANISM,
    PRIVACY_UNIT,
    SAMPLING,
    ReleaseRow,
    RoundRow,
    SiteStatement,
)
from medfed.errors import ConfigError
from medfed.privacy.events import DECLARED_PUBLIC

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from medfed.audit.result import AuditResult

NO_PLOTS: Final = "Plots left out: matplotlib is not installed (pip install 'medfed[tracking]')."
_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #176317; font-weight: 600; } .fail { color: #a31515; font-weight: 600; }
.skipped { color: #777; } .finding { color: #a31515; } .note { color: #555; }
figure { display: inline-block; margin: 0 1em 1em 0; } code { font-size: .95em; }
"""


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def statement_rows(site: SiteStatement) -> list[tuple[str, str]]:
    """The statement as (item, value) rows, shared by the HTML and the PDF."""

    data = site.to_json()
    per_round = ", ".join(
        f"{r['run_id']}/{r['round']}: {r['committed'] if r['committed'] is not None else 'open'}"
        f" of {r['reserved']}"
        for r in data["steps_per_round"]
    )
    rows = [
        ("ledger", "verified" if site.verified else "DOES NOT VERIFY (see findings)"),
        ("signing key (registered)", site.key_id or "n/a"),
        ("mechanism", MECHANISM),
        ("privacy unit", PRIVACY_UNIT),
        ("adjacency", ADJACENCY),
        ("sampling", f"{SAMPLING}: q = {_list(data['sample_rates'])}"),
        (
            "patients (released: training / validation)",
            ", ".join(
                f"{c['train']:g} / {c['validation']:g} (seq {c['seq']})"
                for c in data["released_patient_counts"]
            )
            or "none released (format-1 ledger)",
        ),
        ("noise multiplier(s)", _list(data["noise_multipliers"])),
        ("clipping norm(s)", _list(data["clipping_norms"])),
        (
            "steps",
            f"{data['steps_total']} in total; per round (committed of reserved): "
            f"{per_round or 'none'}",
        ),
        ("delta", fmt(site.delta) + f" (ledger entries: {_list(data['ledger_deltas'])})"),
        ("terms (signed in the ledger)", "; ".join(site.terms) or "none (format-1 ledger)"),
        (
            "accountant in the ledger",
            "; ".join(
                f"{name}: {conversion}" for name, conversion in data["ledger_accountants"].items()
            )
            or "n/a",
        ),
        (f"epsilon spent ({site.accountant}, the ledger's accountant)", fmt(site.spent)),
        ("cap / remaining", f"{fmt(site.cap)} / {fmt(site.remaining)}"),
        ("rounds participated", str(data["rounds_participated"])),
        (
            "runs (rounds)",
            "; ".join(f"{run}: {_list(rounds)}" for run, rounds in site.runs.items()) or "none",
        ),
        (
            "library versions (ledger)",
            " | ".join(f"{text} (seq {_list(list(seqs))})" for text, seqs in site.library_versions)
            or "n/a",
        ),
    ]
    if site.site_ledger_entries is not None:
        rows.append(("site's own ledger", f"{site.site_ledger_entries} entries"))
    return rows


def epsilon_rows(site: SiteStatement) -> list[tuple[str, str, str]]:
    """(accountant, epsilon, how it was computed) for every library."""
    if site.epsilons is None:
        return []
    values = site.epsilons.to_json()
    return [(name, fmt(values[name]), text) for name, text in ACCOUNTANT_DESCRIPTIONS.items()]


def render_html(
    *,
    workspace: Path,
    generated_at: str,
    verification: AuditResult,
    sites: Sequence[SiteStatement],
) -> str:
    """The report as one self-contained HTML page."""
    e = html.escape
    result = verification
    verdict = result.verdict
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medfed privacy audit: {e(str(workspace))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Privacy audit</h1>",
        f"<p>Workspace <code>{e(str(workspace))}</code>; generated {e(generated_at)};"
        f" runs: {e(', '.join(result.run_names) or 'none')}.</p>",
        f'<p>Verdict: <span class="{verdict.lower()}">{e(verdict)}</span> '
        f"({len(result.findings)} finding(s)).</p>",
        "<h2>Findings</h2>",
    ]
    if result.findings:
        parts.append("<ul>")
        parts += [f'<li class="finding">{e(f.one_line())}</li>' for f in result.findings]
        parts.append("</ul>")
    else:
        parts.append("<p>None: every check below passed or was skipped.</p>")
    parts.append("<h2>Checks</h2>")
    parts.append(
        _table(
            ["status", "site", "check", "detail"],
            [
                (
                    f'<span class="{c.status}">{e(c.status)}</span>',
                    e(c.site_id or "-"),
                    e(c.name),
                    e(c.detail),
                )
                for c in result.checks
            ],
        )
    )
    draw = plots_available()
    if not draw:
        parts.append(f'<p class="note">{e(NO_PLOTS)}</p>')
    for site in sites:
        parts += _site_html(site, draw)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _site_html(site: SiteStatement, draw: bool) -> list[str]:
    e = html.escape
    parts = [
        f'<section id="site-{e(site.site_id)}">',
        f"<h2>Site {e(site.site_id)}</h2>",
        "<h3>Privacy statement</h3>",
        _table(["item", "value"], [(e(k), e(v)) for k, v in statement_rows(site)]),
        "<h3>Epsilon by library</h3>",
        _table(
            ["accountant", f"epsilon at delta {e(fmt(site.delta))}", "method"],
            [(e(a), e(v), e(m)) for a, v, m in epsilon_rows(site)],
            numeric=(1,),
        ),
    ]
    parts.append("<h3>Released quantities (everything that left the site besides the weights)</h3>")
    parts.append(
        _table(
            ["seq", "run", "round", "quantity", "values", "unit", "noise std", "mechanism"],
            [release_cells(row) for row in site.releases],
            numeric=(0, 2),
        )
        if site.releases
        else "<p>None recorded (format-1 ledger).</p>"
    )
    parts.append(
        _table(
            ["also public", "why"],
            [(e(name), e(reason)) for name, reason in DECLARED_PUBLIC.items()],
        )
    )
    if site.rounds:
        parts.append("<h3>Rounds (ledger)</h3>")
        parts.append(
            _table(
                [
                    "seq",
                    "run",
                    "round",
                    "steps (committed/reserved)",
                    "q",
                    "noise",
                    "clip",
                    "epsilon after",
                ],
                [_round_cells(row) for row in site.rounds],
                numeric=(0, 2, 7),
            )
        )
    if draw:
        parts.append("<h3>Plots</h3>")
        for svg, caption in (
            (epsilon_svg(site), "epsilon after each round, against the cap"),
            (dice_svg(site), "released Dice of each round's global model against epsilon"),
        ):
            if svg:
                parts.append(f"<figure>{svg}<figcaption>{e(caption)}</figcaption></figure>")
    parts.append(f"<h3>Models trained on this site's data ({e(site.models_source)})</h3>")
    if site.models:
        keys = sorted({key for model in site.models for key in model if key != "tags"})
        parts.append(
            _table(keys, [tuple(e(str(model.get(k, ""))) for k in keys) for model in site.models])
        )
    else:
        parts.append("<p>None found.</p>")
    parts.append("<h3>Findings for this site</h3>")
    if site.findings:
        parts.append("<ul>")
        parts += [f'<li class="finding">{e(f.one_line())}</li>' for f in site.findings]
        parts.append("</ul>")
    else:
        parts.append("<p>None.</p>")
    parts.append("</section>")
    return parts


def release_cells(row: ReleaseRow) -> tuple[str, ...]:
    """One release as table cells (escaped), for the HTML and the PDF."""
    r = row.release
    values = ", ".join(f"{name} {fmt(value)}" for name, value in r.values.items())
    return (
        str(r.seq),
        html.escape(r.run_id),
        str(r.round),
        html.escape(r.quantity),
        html.escape(values),
        html.escape(r.unit),
        html.escape(fmt(r.noise_std)),
        html.escape(row.cover),
    )


def _round_cells(row: RoundRow) -> tuple[str, ...]:
    r = row.reservation
    committed = "open" if r.committed_steps is None else str(r.committed_steps)
    return (
        str(r.seq),
        html.escape(r.run_id),
        str(r.round),
        f"{committed}/{r.reserved_steps}",
        html.escape(fmt(r.sample_rate)),
        html.escape(fmt(r.noise_multiplier)),
        html.escape(fmt(r.max_grad_norm)),
        html.escape(fmt(row.epsilon_after)),
    )


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[int] = ()
) -> str:
    """A table from already escaped cells (the header is escaped here)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _list(values: Sequence[Any]) -> str:
    return ", ".join(fmt(v) if isinstance(v, float) else str(v) for v in values) or "n/a"


# PDF --------------------------------------------------------------------------------------


def write_pdf(
    *,
    workspace: Path,
    generated_at: str,
    verification: AuditResult,
    sites: Sequence[SiteStatement],
    path: Path,
) -> None:
    """Text pages and plots with matplotlib's PdfPages."""
    if not plots_available():
        raise ConfigError(
            "a PDF report needs matplotlib, which is not installed",
            hint="pip install 'medfed[tracking]' (MLflow brings matplotlib), or use --format html",
        )
    from matplotlib.backends.backend_pdf import PdfPages

    result = verification
    lines = [
        "medfed privacy audit",
        f"workspace: {workspace}",
        f"generated: {generated_at}",
        f"verdict: {result.verdict} ({len(result.findings)} finding(s))",
        "",
        *result.lines(verbose=True),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path) as pdf:
        for page in _pages(lines):
            pdf.savefig(page)
        for site in sites:
            text = [f"Site {site.site_id}", ""]
            text += [f"{item}: {value}" for item, value in statement_rows(site)]
            text += [
                "",
                "released quantities (seq, run, round, quantity, values, unit, std, cover):",
            ]
            text += [
                "  " + " | ".join(html.unescape(c) for c in release_cells(row))
                for row in site.releases
            ] or ["  none recorded"]
            text += ["", "epsilon by library:"]
            text += [f"  {name}: {value}  ({how})" for name, value, how in epsilon_rows(site)]
            text += ["", "findings:"] + ([f.one_line() for f in site.findings] or ["  none"])
            for page in _pages(text):
                pdf.savefig(page)
            for figure in (epsilon_figure(site), dice_figure(site)):
                if figure is not None:
                    pdf.savefig(figure)


def _pages(lines: Sequence[str], per_page: int = 58) -> Iterator[Figure]:
    from matplotlib.figure import Figure

    wrapped: list[str] = []
    for line in lines:
        wrapped += textwrap.wrap(line, width=105, subsequent_indent="    ") or [""]
    for start in range(0, len(wrapped), per_page):
        figure = Figure(figsize=(8.27, 11.69))
        figure.text(
            0.05,
            0.97,
            "\n".join(wrapped[start : start + per_page]),
            va="top",
            ha="left",
            family="monospace",
            fontsize=7,
            parse_math=False,
        )
        yield figure
