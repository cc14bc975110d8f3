"""The report of a large federation: federation-wide tables in place of a section per site.

A section per site (statement, tables, two plots) is what an auditor wants for a handful of
hospitals; for a thousand virtual sites it made a report of tens of megabytes of HTML and a PDF
that never finished. Above :data:`DETAIL_LIMIT` sites the report says what holds for the whole
federation (how epsilon spent is distributed, the terms the ledgers were kept under, what was
released, the checks by kind), names the sites near their cap, and keeps a full section for
every site with a finding: a site the audit found something wrong with is never summarised
away. Every site's full statement stays in the report's JSON (and one row per site in a CSV,
:func:`medfed.audit.sites_csv.sites_csv`), which the report names.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from medfed.audit import figures
from medfed.audit.canary import CanaryAudit
from medfed.audit.document import Block, Paragraph, Plot, Section, Span, Table, text
from medfed.audit.findings import Check, CheckStatus, fmt
from medfed.audit.plain_language import round_down, round_up
from medfed.audit.statement import SiteStatement

DETAIL_LIMIT: Final = 50
"""Up to this many sites the report has a section per site; above it, federation-wide tables."""
NEAR_CAP_SHARE: Final = 0.9
"""A site that spent at least this share of its cap is listed as near its cap."""
MAX_LISTED: Final = 50
"""Sites near their cap named in the report at most (the most spent first); the CSV has all."""
MAX_DISTINCT: Final = 10
"""Distinct values of a term (noise, sampling rate, ...) shown with their counts at most."""
DETAIL_ELSEWHERE: Final = (
    "every site's full statement is in this report's JSON form (`medfed audit report "
    "--format json`)"
)
_SHARE_BINS: Final = (0.0, 0.25, 0.5, 0.75, NEAR_CAP_SHARE, 1.0)


def summarised(sites: Sequence[SiteStatement]) -> bool:
    """Whether a report of ``sites`` summarises them instead of a section per site."""
    return len(sites) > DETAIL_LIMIT


def shown_in_full(site: SiteStatement, audits: Sequence[CanaryAudit]) -> bool:
    """A site with a finding, or an empirical audit that measured more loss than claimed."""
    return bool(site.findings) or any(audit.violated for audit in audits)


def share_of_cap(site: SiteStatement) -> float | None:
    """Epsilon spent over the cap (inf when unbounded); None without a cap or an epsilon."""
    if site.cap is None or site.spent is None or site.cap <= 0:
        return None
    return site.spent / site.cap


def detail_paragraph(*, total: int, full: int, detail: str) -> Paragraph:
    """What this report leaves out, and where it is instead."""
    return Paragraph(
        spans=(
            Span(
                text=f"This federation has {total} sites, more than {DETAIL_LIMIT}: ",
                style="strong",
            ),
            Span(
                text="instead of a section per site this report gives federation-wide tables, "
                f"names the sites near their cap and keeps a full section for each of the {full} "
                f"site(s) with a finding; {detail}."
            ),
        ),
        style="note",
    )


def summary_blocks(sites: Sequence[SiteStatement]) -> list[Block]:
    """The plain-language summary of the whole federation, in a few sentences."""
    verified = [s for s in sites if s.verified]
    bounded = [s for s in verified if s.spent is not None and math.isfinite(s.spent)]
    above = [s for s in bounded if s.cap is not None and s.spent is not None and s.spent > s.cap]
    no_cap = [s for s in bounded if s.cap is None and s.spent]
    unguaranteed = len(sites) - len(bounded)
    spent = [s.spent for s in bounded if s.spent is not None]
    sentence = f"Of the {len(sites)} sites, {len(bounded)} have a guarantee that this report states"
    if spent:
        sentence += (
            f": for any one patient of such a site, epsilon is at most {round_up(max(spent))} "
            f"(the largest of them; median {round_up(statistics.median(spent))}, smallest "
            f"{round_up(min(spent))}), each at its ledger's delta and with its ledger's accountant"
        )
    sentence += "."
    parts = [sentence]
    caps = [s for s in bounded if s.cap is not None]
    if caps:
        left = [
            s.cap - s.spent
            for s in caps
            if s.cap is not None and s.spent is not None and s.spent <= s.cap
        ]
        within = len(caps) - len(above)
        parts.append(
            f"{within} of the {len(caps)} sites with a cap stay within it"
            + (f" (the least left of a cap is {round_down(min(left))})" if left else "")
            + (f"; {len(above)} spent more than they agreed to." if above else ".")
        )
    if no_cap:
        parts.append(f"{len(no_cap)} site(s) spent privacy under terms that name no cap.")
    if unguaranteed:
        parts.append(
            f"For {unguaranteed} site(s) this report states no guarantee (a ledger that does not "
            "verify, no delta, or no finite epsilon); those with a finding have a section of "
            "their own below, and every one a row in the per-site data."
        )
    blocks: list[Block] = [
        Paragraph(spans=(Span(text="The federation. ", style="strong"), Span(text=" ".join(parts))))
    ]
    return blocks


def checks_table(checks: Sequence[Check]) -> Table:
    """Workspace-wide checks one by one; a site's checks counted by kind, with one example."""
    rows: list[tuple[str | Span, ...]] = [
        (Span(text=c.status, style=c.status), "-", c.name, "1", c.detail)
        for c in checks
        if c.site_id is None
    ]
    groups: dict[tuple[CheckStatus, str], list[Check]] = {}
    for check in checks:
        if check.site_id is not None:
            groups.setdefault((check.status, check.name), []).append(check)
    for (_, name), found in sorted(groups.items()):
        first = found[0]
        example = f"e.g. site {first.site_id}: {first.detail}"
        distinct = len({c.detail for c in found})
        if distinct > 1:
            example += f" ({distinct} distinct details)"
        status = Span(text=first.status, style=first.status)
        rows.append((status, "per site", name, str(len(found)), example))
    return Table(
        header=("status", "scope", "check", "sites", "detail"),
        rows=tuple(rows),
        numeric=frozenset({3}),
        nowrap=frozenset({0, 1, 3}),
    )


def sites_section(
    sites: Sequence[SiteStatement],
    *,
    audits: Sequence[CanaryAudit],
    draw: bool,
    detail: str,
) -> Section:
    """Federation-wide: epsilon across sites, sites near their cap, terms, releases, audits."""
    parts: list[Section] = [
        _section(
            "Epsilon and budgets across sites",
            _distribution_table(sites),
            _share_table(sites),
        )
    ]
    if draw:
        figure = figures.spent_figure(sites)
        if figure is not None:
            parts.append(
                _section(
                    "Plots",
                    Plot(
                        figure=figure,
                        caption="epsilon spent across sites, as a share of each site's cap",
                    ),
                )
            )
    parts.append(_near_cap(sites, detail=detail))
    parts.append(_section("Terms the ledgers were kept under", _terms_table(sites)))
    parts.append(_section("Released quantities across sites", _releases_table(sites)))
    parts.append(_section("Models trained on the sites' data", *_models_blocks(sites)))
    if audits:
        parts.append(_section("Empirical privacy audits", _audits_table(audits)))
    return Section(
        heading=f"Sites: the federation of {len(sites)}",
        level=2,
        blocks=tuple(parts),
        anchor="sites",
        starts_page=True,
    )


def _section(heading: str, *blocks: Block) -> Section:
    return Section(heading=heading, level=3, blocks=blocks)


_Getter = Callable[[SiteStatement], float | None]
_QUANTITIES: Final[tuple[tuple[str, _Getter], ...]] = (
    ("epsilon spent (ledger's accountant)", lambda s: s.spent),
    ("cap", lambda s: s.cap),
    ("remaining", lambda s: s.remaining),
    ("share of cap", share_of_cap),
    ("Opacus RDP", lambda s: None if s.epsilons is None else s.epsilons.opacus_rdp),
    ("dp-accounting RDP", lambda s: None if s.epsilons is None else s.epsilons.dp_accounting_rdp),
    ("dp-accounting PLD", lambda s: None if s.epsilons is None else s.epsilons.pld),
    ("RDP, classic conversion", lambda s: None if s.epsilons is None else s.epsilons.rdp_classic),
    ("rounds in the ledger", lambda s: float(len(s.rounds))),
    ("DP-SGD steps", lambda s: float(sum(r.reservation.counted_steps for r in s.rounds))),
)


def _distribution_table(sites: Sequence[SiteStatement]) -> Table:
    rows = []
    for name, get in _QUANTITIES:
        values = [v for v in (get(s) for s in sites) if v is not None]
        finite = sorted(v for v in values if math.isfinite(v))
        infinite = len(values) - len(finite)
        if finite:
            stats = (
                fmt(finite[0]),
                fmt(_quantile(finite, 0.25)),
                fmt(statistics.median(finite)),
                fmt(_quantile(finite, 0.9)),
                fmt(finite[-1]),
            )
        else:
            stats = ("n/a",) * 5
        rows.append((name, str(len(values)), str(infinite), *stats))
    return Table(
        header=("quantity", "sites", "unbounded", "min", "25%", "median", "90%", "max"),
        rows=tuple(rows),
        numeric=frozenset(range(1, 8)),
        nowrap=frozenset(range(1, 8)),
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, linear between neighbours."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _share_table(sites: Sequence[SiteStatement]) -> Table:
    counts: Counter[str] = Counter()
    labels = [f"{low:.0%} to under {high:.0%}" for low, high in itertools.pairwise(_SHARE_BINS)]
    for site in sites:
        share = share_of_cap(site)
        if not site.verified or site.spent is None:
            counts["no guarantee stated (see the site's section)"] += 1
        elif share is None:
            counts["no cap"] += 1
        elif share > 1.0:
            counts["above the cap"] += 1
        elif share == 1.0:
            counts["exactly the cap"] += 1
        else:
            index = max(i for i, low in enumerate(_SHARE_BINS[:-1]) if share >= low)
            counts[labels[index]] += 1
    order = [
        *labels,
        "exactly the cap",
        "above the cap",
        "no cap",
        "no guarantee stated (see the site's section)",
    ]
    return Table(
        header=("epsilon spent, as a share of the site's cap", "sites"),
        rows=tuple((label, str(counts[label])) for label in order if counts[label]),
        numeric=frozenset({1}),
        nowrap=frozenset({1}),
    )


def _near_cap(sites: Sequence[SiteStatement], *, detail: str) -> Section:
    near = [
        (share, site)
        for site in sites
        if (share := share_of_cap(site)) is not None and share >= NEAR_CAP_SHARE
    ]
    near.sort(key=lambda item: (-item[0], item[1].site_id))
    heading = f"Sites near their cap (at least {NEAR_CAP_SHARE:.0%} of it spent)"
    if not near:
        return _section(heading, text("None."))
    table = Table(
        header=("site", "epsilon spent", "cap", "remaining", "share of cap", "findings"),
        rows=tuple(
            (
                site.site_id,
                fmt(site.spent),
                fmt(site.cap),
                fmt(site.remaining),
                f"{share:.1%}" if math.isfinite(share) else "inf",
                str(len(site.findings)),
            )
            for share, site in near[:MAX_LISTED]
        ),
        numeric=frozenset({1, 2, 3, 4, 5}),
        nowrap=frozenset({0, 1, 2, 3, 4, 5}),
    )
    blocks: list[Block] = [table]
    if len(near) > MAX_LISTED:
        blocks.append(
            text(
                f"{len(near)} sites in all; the {MAX_LISTED} with the largest share are listed, "
                f"the rest are in the per-site data: {detail}.",
                "note",
            )
        )
    return _section(heading, *blocks)


def _terms_table(sites: Sequence[SiteStatement]) -> Table:
    fields: tuple[tuple[str, Callable[[SiteStatement], Iterable[object]]], ...] = (
        ("accountant", lambda s: [s.accountant]),
        ("delta", lambda s: s.deltas or ([s.delta] if s.delta is not None else [])),
        ("cap", lambda s: [] if s.cap is None else [s.cap]),
        ("noise multiplier", lambda s: s.distinct("noise_multiplier")),
        ("sampling rate q", lambda s: s.distinct("sample_rate")),
        ("clipping norm", lambda s: s.distinct("max_grad_norm")),
        ("library versions", lambda s: [versions for versions, _ in s.library_versions]),
    )
    rows = []
    for name, values_of in fields:
        counts: Counter[str] = Counter()
        for site in sites:
            for value in dict.fromkeys(values_of(site)):
                counts[fmt(value) if isinstance(value, float) else str(value)] += 1
        shown = counts.most_common(MAX_DISTINCT)
        text_ = "; ".join(f"{value} ({count} sites)" for value, count in shown) or "n/a"
        if len(counts) > len(shown):
            text_ += f"; and {len(counts) - len(shown)} other value(s)"
        rows.append((name, str(len(counts)), text_))
    return Table(
        header=("term", "distinct values", "values (sites with it)"),
        rows=tuple(rows),
        numeric=frozenset({1}),
        nowrap=frozenset({0, 1}),
    )


def _releases_table(sites: Sequence[SiteStatement]) -> Table | Paragraph:
    counts: Counter[tuple[str, str]] = Counter()
    per_site: dict[tuple[str, str], set[str]] = {}
    for site in sites:
        for row in site.releases:
            key = (row.release.quantity, row.release.mechanism)
            counts[key] += 1
            per_site.setdefault(key, set()).add(site.site_id)
    if not counts:
        return text("None recorded (format-1 ledgers).")
    return Table(
        header=("quantity", "mechanism", "releases", "sites"),
        rows=tuple(
            (quantity, mechanism, str(count), str(len(per_site[(quantity, mechanism)])))
            for (quantity, mechanism), count in sorted(counts.items())
        ),
        numeric=frozenset({2, 3}),
        nowrap=frozenset({1, 2, 3}),
    )


def _models_blocks(sites: Sequence[SiteStatement]) -> tuple[Block, ...]:
    """Each distinct model once, with how many sites' data it was trained on."""
    found: dict[tuple[str, ...], int] = {}
    for site in sites:
        for model in site.models:
            key = tuple(
                str(model.get(name, ""))
                for name in ("run_name", "name", "version", "round", "sha256")
            )
            found[key] = found.get(key, 0) + 1
    if not found:
        return (text("None found."),)
    rows = sorted(found.items())
    table = Table(
        header=("run", "name", "version", "round", "sha256", "sites"),
        rows=tuple((*key, str(count)) for key, count in rows[:MAX_LISTED]),
        numeric=frozenset({2, 3, 5}),
        nowrap=frozenset({2, 3, 5}),
    )
    if len(rows) <= MAX_LISTED:
        return (table,)
    return (table, text(f"{len(rows)} models in all; the first {MAX_LISTED} are listed.", "note"))


def _audits_table(audits: Sequence[CanaryAudit]) -> Table:
    return Table(
        header=("site", "run", "claimed epsilon", "lower bound", "verdict"),
        rows=tuple(
            (
                audit.site_id,
                audit.run_id,
                fmt(audit.claimed_epsilon),
                fmt(audit.lower_bound),
                Span(
                    text="violated" if audit.violated else "not violated",
                    style="finding" if audit.violated else "pass",
                ),
            )
            for audit in audits
        ),
        numeric=frozenset({2, 3}),
        nowrap=frozenset({0, 2, 3}),
    )
