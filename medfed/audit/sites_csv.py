"""One row per site of an audit report, as CSV: the machine-readable table beside the pages.

The report of a large federation (:mod:`medfed.audit.overview`) names no site without a
finding; this table has every site's verification, epsilon by library, cap and findings, for a
spreadsheet or a script. The report's JSON holds each site's whole statement.

A federation where some site took distributed-noise steps gets :data:`DISTRIBUTED_COLUMNS` at
the end (empty for the sites without such steps); other tables stay as they were.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from typing import Final

from medfed.audit.overview import share_of_cap
from medfed.audit.statement import SiteStatement

CSV_COLUMNS: Final = (
    "site_id",
    "ledger_verified",
    "key_id",
    "accountant",
    "delta",
    "epsilon_spent",
    "epsilon_cap",
    "epsilon_remaining",
    "share_of_cap",
    "opacus_rdp",
    "dp_accounting_rdp",
    "pld",
    "rdp_classic",
    "rounds",
    "steps",
    "runs",
    "findings",
    "finding_checks",
)
DISTRIBUTED_COLUMNS: Final = (
    "epsilon_distributed",
    "distributed_sites",
    "epsilon_local",
    "budget_enforced_on",
)


def sites_csv(sites: Iterable[SiteStatement]) -> str:
    """One row per site: its verification, epsilon by library, cap, rounds and findings."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    sites = list(sites)
    with_distributed = any(site.distributed is not None for site in sites)
    writer.writerow(CSV_COLUMNS + (DISTRIBUTED_COLUMNS if with_distributed else ()))
    for site in sites:
        eps = site.epsilons
        share = share_of_cap(site)
        writer.writerow(
            (
                site.site_id,
                "yes" if site.verified else "no",
                site.key_id or "",
                site.accountant,
                _csv_number(site.delta),
                _csv_number(site.spent),
                _csv_number(site.cap),
                _csv_number(site.remaining),
                _csv_number(share),
                _csv_number(None if eps is None else eps.opacus_rdp),
                _csv_number(None if eps is None else eps.dp_accounting_rdp),
                _csv_number(None if eps is None else eps.pld),
                _csv_number(None if eps is None else eps.rdp_classic),
                len(site.rounds),
                sum(row.reservation.counted_steps for row in site.rounds),
                " ".join(site.runs),
                len(site.findings),
                " ".join(sorted({f.check for f in site.findings})),
                *(_distributed_cells(site) if with_distributed else ()),
            )
        )
    return buffer.getvalue()


def _distributed_cells(site: SiteStatement) -> tuple[str, ...]:
    d = site.distributed
    if d is None:
        return ("",) * len(DISTRIBUTED_COLUMNS)
    return (
        _csv_number(d.distributed),
        " ".join(map(str, d.sites)),
        _csv_number(d.local),
        " ".join(d.budget),
    )


def _csv_number(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) else repr(float(value))
