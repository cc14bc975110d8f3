"""What the auditor's report says, as one :class:`~medfed.audit.document.Document`.

A plain-language summary first (what each site's guarantee means for one of its patients), then
the verification's findings and checks, then one section per site: its privacy statement,
epsilon by library, released quantities, rounds, plots, the models trained on its data and its
findings. A federation of more sites than :data:`medfed.audit.overview.DETAIL_LIMIT` gets
federation-wide tables instead, and a section only for each site with a finding. The HTML and
the PDF are both drawn from this one document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from medfed.audit import figures, overview
from medfed.audit.accounting import (
    ACCOUNTANT_DESCRIPTIONS,
    GAUSSIAN_EQUIVALENT_NOTE,
    LOCAL_LABEL,
)
from medfed.audit.canary import LOWER_BOUND_NOTE, CanaryAudit
from medfed.audit.document import (
    Block,
    Bullets,
    Document,
    Paragraph,
    Plot,
    Section,
    Span,
    Table,
    text,
)
from medfed.audit.findings import fmt
from medfed.audit.plain_language import reading_guide, summary_paragraphs, verdict_paragraph
from medfed.audit.result import AuditResult
from medfed.audit.statement import (
    ADJACENCY,
    MECHANISM,
    PRIVACY_UNIT,
    SAMPLING,
    ReleaseRow,
    RoundRow,
    SiteStatement,
)
from medfed.privacy.events import DECLARED_PUBLIC

SUMMARY_HEADING: Final = "Summary: what this means for each site's patients"
# Models' fields in this order; any other field follows, sorted.
_MODEL_FIELDS: Final[tuple[str, ...]] = (
    "run_name",
    "name",
    "version",
    "round",
    "final",
    "direct",
    "sites",
    "run_id",
    "source",
    "path",
    "sha256",
)


def build_document(
    *,
    workspace: Path,
    generated_at: str,
    verification: AuditResult,
    sites: Sequence[SiteStatement],
    canary_audits: Sequence[CanaryAudit] = (),
    plots: bool | None = None,
    detail: str = overview.DETAIL_ELSEWHERE,
) -> Document:
    """The whole report; ``plots`` None draws them where matplotlib is installed.

    Above :data:`medfed.audit.overview.DETAIL_LIMIT` sites the report is the federation's
    (:mod:`medfed.audit.overview`) with a section only for each site with a finding; ``detail``
    says where every site's full statement is then.
    """
    result = verification
    draw = figures.plots_available() if plots is None else plots
    wide = overview.summarised(sites)
    full = [
        site
        for site in sites
        if not wide or overview.shown_in_full(site, _of(canary_audits, site.site_id))
    ]
    blocks: list[Block] = [
        Paragraph(
            spans=(
                Span(text="Workspace "),
                Span(text=str(workspace), style="code"),
                Span(
                    text=f"; generated {generated_at}; "
                    f"runs: {', '.join(result.run_names) or 'none'}."
                ),
            )
        ),
        Paragraph(
            spans=(
                Span(text="Verdict: "),
                Span(text=result.verdict, style="pass" if result.passed else "fail"),
                Span(text=f" ({len(result.findings)} finding(s))."),
            )
        ),
        *(
            [overview.detail_paragraph(total=len(sites), full=len(full), detail=detail)]
            if wide
            else []
        ),
        *([_run_modes(result)] if result.run_modes else []),
        _summary(result, sites, canary_audits, full=full if wide else None),
        Section(
            heading="Findings",
            level=2,
            blocks=(
                Bullets(items=tuple(f.one_line() for f in result.findings), style="finding")
                if result.findings
                else text("None: every check below passed or was skipped."),
            ),
        ),
        Section(
            heading="Checks",
            level=2,
            blocks=(overview.checks_table(result.checks) if wide else _checks(result),),
        ),
    ]
    if not draw:
        blocks.append(text(figures.NO_PLOTS, "note"))
    if wide:
        blocks.append(overview.sites_section(sites, audits=canary_audits, draw=draw, detail=detail))
    # Two plots per site are what made large reports explode: past the limit, the sections
    # of the sites with findings keep their tables (the same numbers) and leave the plots out.
    per_site_plots = draw and len(full) <= overview.DETAIL_LIMIT
    blocks += [
        _site(
            site, draw=per_site_plots, workspace=workspace, audits=_of(canary_audits, site.site_id)
        )
        for site in full
    ]
    known = {site.site_id for site in sites}
    others = [audit for audit in canary_audits if audit.site_id not in known]
    if others:
        blocks.append(
            Section(
                heading="Empirical privacy audit",
                level=2,
                blocks=tuple(
                    Section(
                        heading=f"Site {audit.site_id} (not in this report): {audit.run_id}",
                        level=3,
                        blocks=canary_blocks(audit),
                    )
                    for audit in others
                ),
                anchor="empirical-privacy-audit",
                starts_page=True,
            )
        )
    return Document(
        title=f"medfed privacy audit: {workspace}",
        body=Section(heading="Privacy audit", level=1, blocks=tuple(blocks)),
    )


def _summary(
    result: AuditResult,
    sites: Sequence[SiteStatement],
    audits: Sequence[CanaryAudit],
    *,
    full: Sequence[SiteStatement] | None = None,
) -> Section:
    """A paragraph per site; with ``full``, the federation's and one per site in ``full``."""
    blocks: list[Block] = [verdict_paragraph(findings=len(result.findings)), reading_guide()]
    if full is not None:
        blocks += overview.summary_blocks(sites)
    for site in sites if full is None else full:
        blocks += summary_paragraphs(site, canary_audits=_of(audits, site.site_id))
    return Section(heading=SUMMARY_HEADING, level=2, blocks=tuple(blocks), anchor="summary")


def _run_modes(result: AuditResult) -> Table:
    """Each run's aggregation and noise: which of a site's epsilons its guarantee rests on."""
    return Table(
        header=("run", "aggregation and noise"),
        rows=tuple((mode.run_name, mode.describe()) for mode in result.run_modes),
        nowrap=frozenset({0}),
    )


def _checks(result: AuditResult) -> Table:
    return Table(
        header=("status", "site", "check", "detail"),
        rows=tuple(
            (Span(text=c.status, style=c.status), c.site_id or "-", c.name, c.detail)
            for c in result.checks
        ),
        nowrap=frozenset({0, 1}),
    )


def _of(audits: Sequence[CanaryAudit], site_id: str) -> list[CanaryAudit]:
    return [audit for audit in audits if audit.site_id == site_id]


def canary_blocks(audit: CanaryAudit) -> tuple[Block, ...]:
    """One canary audit: its table, its verdict (a finding when violated), what it shows."""
    return (
        Table(header=("item", "value"), rows=tuple(audit.rows()), nowrap=frozenset({0})),
        text(audit.verdict(), "finding" if audit.violated else "pass"),
        text(LOWER_BOUND_NOTE, "note"),
    )


def _site(
    site: SiteStatement, *, draw: bool, workspace: Path, audits: Sequence[CanaryAudit]
) -> Section:
    parts: list[Section] = [
        _section("Privacy statement", _statement_table(site)),
        _section(
            "Epsilon by library",
            Table(
                header=("accountant", f"epsilon at delta {fmt(site.delta)}", "method"),
                rows=tuple(epsilon_rows(site)),
                numeric=frozenset({1}),
                nowrap=frozenset({0, 1}),
            ),
        ),
        _section(
            "Released quantities (everything that left the site besides the weights)",
            Table(
                header=(
                    "seq",
                    "run",
                    "round",
                    "quantity",
                    "values",
                    "unit",
                    "noise std",
                    "mechanism",
                ),
                rows=tuple(release_cells(row) for row in site.releases),
                numeric=frozenset({0, 2}),
                nowrap=frozenset({0, 2}),
            )
            if site.releases
            else text("None recorded (format-1 ledger)."),
            Table(
                header=("also public", "why"),
                rows=tuple(DECLARED_PUBLIC.items()),
                nowrap=frozenset({0}),
            ),
        ),
    ]
    if site.rounds:
        parts.append(
            _section(
                "Rounds (ledger)",
                Table(
                    header=(
                        "seq",
                        "run",
                        "round",
                        "steps (committed/reserved)",
                        "q",
                        "noise",
                        "clip",
                        "epsilon after",
                    ),
                    rows=tuple(round_cells(row) for row in site.rounds),
                    numeric=frozenset({0, 2, 7}),
                    nowrap=frozenset({0, 2, 3, 4, 5, 6, 7}),
                ),
            )
        )
    if draw:
        found = _plots(site)
        if found:
            parts.append(_section("Plots", *found))
    parts.append(
        _section(
            f"Models trained on this site's data ({site.models_source})",
            _models(site.models, workspace=workspace) if site.models else text("None found."),
        )
    )
    for audit in audits:
        parts.append(_section(f"Empirical privacy audit: {audit.run_id}", *canary_blocks(audit)))
    parts.append(
        _section(
            "Findings for this site",
            Bullets(items=tuple(f.one_line() for f in site.findings), style="finding")
            if site.findings
            else text("None."),
        )
    )
    return Section(
        heading=f"Site {site.site_id}",
        level=2,
        blocks=tuple(parts),
        anchor=f"site-{site.site_id}",
        starts_page=True,
    )


def _section(heading: str, *blocks: Block) -> Section:
    return Section(heading=heading, level=3, blocks=blocks)


def _plots(site: SiteStatement) -> list[Plot]:
    drawn = (
        (figures.epsilon_figure(site), "epsilon after each round, against the cap"),
        (
            figures.dice_figure(site),
            "released Dice of each round's global model against epsilon",
        ),
    )
    return [Plot(figure=figure, caption=caption) for figure, caption in drawn if figure]


def _statement_table(site: SiteStatement) -> Table:
    return Table(header=("item", "value"), rows=tuple(statement_rows(site)))


def statement_rows(site: SiteStatement) -> list[tuple[str, str]]:
    """The statement as (item, value) rows."""
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
                f"sealed at the site (seq {c['seq']})"
                if "sealed" in c
                else f"{c['train']:g} / {c['validation']:g} (seq {c['seq']})"
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
        *distributed_rows(site),
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


def distributed_rows(site: SiteStatement) -> list[tuple[str, str]]:
    """Both guarantees of a site with distributed-noise steps, and the one its budget is on."""
    d = site.distributed
    if d is None:
        return []
    return [
        (d.distributed_label, fmt(d.distributed)),
        (LOCAL_LABEL, fmt(d.local)),
        (
            "budget enforced on",
            f"the {d.enforced_on} (distributed-noise reservations: seq {_list(list(d.seqs))})",
        ),
        ("distributed noise", GAUSSIAN_EQUIVALENT_NOTE),
    ]


def epsilon_rows(site: SiteStatement) -> list[tuple[str, str, str]]:
    """(accountant, epsilon, how it was computed) for every library."""
    if site.epsilons is None:
        return []
    values = site.epsilons.to_json()
    return [(name, fmt(values[name]), how) for name, how in ACCOUNTANT_DESCRIPTIONS.items()]


def release_cells(row: ReleaseRow) -> tuple[str, ...]:
    """One release as table cells: seq, run, round, quantity, values, unit, noise std, cover."""
    r = row.release
    values = ", ".join(f"{name} {fmt(value)}" for name, value in r.values.items())
    if r.sealed is not None:
        values = f"sealed at the site (commitment {r.sealed[:12]}...)"
    return (
        str(r.seq),
        r.run_id,
        str(r.round),
        r.quantity,
        values,
        r.unit,
        fmt(r.noise_std),
        row.cover,
    )


def round_cells(row: RoundRow) -> tuple[str, ...]:
    """One reserved round: seq, run, round, steps, q, noise, clip, epsilon after."""
    r = row.reservation
    committed = "open" if r.committed_steps is None else str(r.committed_steps)
    return (
        str(r.seq),
        r.run_id,
        str(r.round),
        f"{committed}/{r.reserved_steps}",
        fmt(r.sample_rate),
        fmt(r.noise_multiplier),
        fmt(r.max_grad_norm),
        fmt(row.epsilon_after),
    )


def _models(models: Sequence[Mapping[str, Any]], *, workspace: Path) -> Table:
    present = {key for model in models for key in model if key != "tags"}
    keys = [key for key in _MODEL_FIELDS if key in present]
    keys += sorted(present - set(keys))
    short = frozenset(i for i, key in enumerate(keys) if key in ("round", "version"))
    return Table(
        header=tuple(keys),
        rows=tuple(
            tuple(_value(key, model.get(key), workspace=workspace) for key in keys)
            for model in models
        ),
        nowrap=short,
        numeric=short,
    )


def _value(key: str, value: Any, *, workspace: Path) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    if key == "path" and isinstance(value, str):
        # Checkpoints live in the workspace named at the top: its folder, once, is enough.
        path = Path(value)
        return str(path.relative_to(workspace)) if path.is_relative_to(workspace) else value
    return "" if value is None else str(value)


def _list(values: Sequence[Any]) -> str:
    return ", ".join(fmt(v) if isinstance(v, float) else str(v) for v in values) or "n/a"
