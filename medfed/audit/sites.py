"""One site's part of an audit: its key, its ledgers, its epsilon from two libraries, its cap."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.audit.accounting import (
    INTEGER_ORDER_TOLERANCE,
    LOCAL_LABEL,
    PLD_ABOVE_RDP_TOLERANCE,
    DistributedEpsilons,
    Epsilons,
    distributed_epsilons,
    recompute,
)
from medfed.audit.findings import Collector, Finding, fmt, ledger_finding, relative_difference
from medfed.audit.result import SiteAudit
from medfed.audit.runs import VerifiedCopy
from medfed.errors import ConfigError, LedgerError
from medfed.privacy.accounting import compute_epsilon
from medfed.privacy.budget import PrivacyTerms
from medfed.privacy.ledger import LedgerReport, verify_ledger, verify_ledger_bytes
from medfed.storage import read_bytes
from medfed.workspace import Workspace


def audit_site(
    *, workspace: Workspace, site_id: str, site_ledger: Path | None, collect: Collector
) -> tuple[SiteAudit, VerifiedCopy | None]:
    """Steps 1, 2, 3 and 5 of :mod:`medfed.audit.verify` for one site; its verified copy.

    ``site_ledger``: the path of a ledger the site handed over, if any.
    """
    empty = SiteAudit(
        site_id=site_id,
        key_id=None,
        copy=None,
        site_ledger=None,
        terms=None,
        epsilons=None,
        epsilon=None,
        site_ledger_epsilon=None,
    )
    try:
        public_key = workspace.ledger_public_key(site_id)
    except ConfigError as exc:
        collect.findings.append(Finding(site_id=site_id, check="key", problem=exc.message))
        return empty, None
    key = workspace.site(site_id).ledger_key_id
    path = workspace.layout.ledger_copy(site_id)
    source = relative_source(workspace=workspace, path=path)
    data = read_bytes(path)
    copy: LedgerReport | None = None
    try:
        copy = verify_ledger_bytes(data, public_key=public_key, site_id=site_id, source=source)
    except LedgerError as exc:
        collect.findings.append(
            ledger_finding(site_id=site_id, check="ledger-copy", source=source, message=exc.message)
        )
    else:
        collect.passed(
            site_id,
            "ledger copy",
            f"{source}: {len(copy.entries)} entries; chain, signatures (registered key {key}), "
            "canonical form, seq order and commits hold",
        )
    own, own_data = _site_ledger(site_id, site_ledger, public_key, collect)
    if own_data is not None and site_ledger is not None:
        _compare(site_id, data, source, own_data, str(site_ledger), collect)
    terms = _terms(copy, own)
    if terms is None and copy is not None and copy.entries:
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="cap",
                problem="cannot check the budget: the ledger names no terms (accountant, delta, "
                "cap); a format-1 ledger gets them with the site's next round",
            )
        )
    _check_terms(site_id, source, copy, collect)
    delta = terms.delta if terms is not None else _legacy_delta(copy, own)
    accountant = terms.accountant if terms is not None else "rdp"
    epsilons = (
        None if copy is None or delta is None else recompute(history=copy.history, delta=delta)
    )
    copy_epsilon = site_epsilon = None
    if copy is not None and delta is not None:
        copy_epsilon = compute_epsilon(history=copy.history, delta=delta, accountant=accountant)
    if own is not None and delta is not None:
        site_epsilon = compute_epsilon(history=own.history, delta=delta, accountant=accountant)
    distributed = None
    if delta is not None:
        reports = [report for report in (copy, own) if report is not None]
        distributed = distributed_epsilons(reports=reports, delta=delta, accountant=accountant)
    if epsilons is not None:
        check_libraries(site_id=site_id, eps=epsilons, collect=collect)
    if distributed is not None:
        _report_distributed(site_id, distributed, collect)
    audit = SiteAudit(
        site_id=site_id,
        key_id=key,
        copy=copy,
        site_ledger=own,
        terms=terms,
        epsilons=epsilons,
        epsilon=copy_epsilon,
        site_ledger_epsilon=site_epsilon,
        distributed=distributed,
    )
    _check_cap(audit, collect)
    verified = None if copy is None else VerifiedCopy(data=data, report=copy, public_key=public_key)
    return audit, verified


def _site_ledger(
    site_id: str, path: Path | None, public_key: Ed25519PublicKey, collect: Collector
) -> tuple[LedgerReport | None, bytes | None]:
    """Verify a ledger the site handed over (with its head file); its report and bytes."""
    if path is None:
        return None, None
    if not path.is_file():
        raise ConfigError(f"--ledger {site_id}={path}: no such file")
    data = read_bytes(path)
    try:
        report = verify_ledger(path, public_key=public_key, site_id=site_id)
    except LedgerError as exc:
        collect.findings.append(
            ledger_finding(
                site_id=site_id, check="site-ledger", source=str(path), message=exc.message
            )
        )
        return None, data
    collect.passed(
        site_id,
        "site ledger",
        f"{path}: {len(report.entries)} entries and its head verify against the registered key",
    )
    return report, data


def _compare(
    site_id: str, copy: bytes, copy_source: str, site: bytes, site_source: str, collect: Collector
) -> None:
    """The aggregator's copy must be the site ledger's first entries, byte for byte."""
    held, at_site = _lines(copy), _lines(site)
    for index, line in enumerate(held):
        if index >= len(at_site):
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="agreement",
                    source=site_source,
                    line=index + 1,
                    seq=index,
                    problem=f"the site's ledger ends after {len(at_site)} entries but the "
                    f"aggregator's copy ({copy_source}) holds {len(held)}: the site's ledger "
                    "was rolled back or cut",
                )
            )
            return
        if at_site[index] != line:
            collect.findings.append(
                Finding(
                    site_id=site_id,
                    check="agreement",
                    source=site_source,
                    line=index + 1,
                    seq=index,
                    problem=f"differs from the same entry in the aggregator's copy ({copy_source}):"
                    " the two ledgers diverge here",
                )
            )
            return
    extra = len(at_site) - len(held)
    collect.passed(
        site_id,
        "site ledger vs copy",
        f"the copy's {len(held)} entries are the site ledger's first"
        + (f"; {extra} more at the site (rounds the aggregator has not seen)" if extra else ""),
    )


def _lines(data: bytes) -> list[bytes]:
    """A ledger's lines as the verifier splits them (a torn last line counts as one)."""
    lines = data.split(b"\n")
    return lines[:-1] if lines[-1] == b"" else lines


def _terms(copy: LedgerReport | None, site: LedgerReport | None) -> PrivacyTerms | None:
    """The terms of the longer of the two ledgers (the site's may hold newer entries)."""
    reports = [r for r in (site, copy) if r is not None]
    reports.sort(key=lambda r: len(r.entries), reverse=True)
    return next((r.terms for r in reports if r.terms is not None), None)


def _legacy_delta(copy: LedgerReport | None, site: LedgerReport | None) -> float | None:
    """Without terms, the smallest delta format-1 entries name (the strictest)."""
    deltas = [r.legacy_delta for r in (copy, site) if r and r.legacy_delta is not None]
    return min(deltas) if deltas else None


def _check_terms(site_id: str, source: str, copy: LedgerReport | None, collect: Collector) -> None:
    """A raised cap or delta in the ledger's terms is for the auditor to look at."""
    if copy is None:
        return
    raised = [c for c in copy.terms_changes if c.raised]
    for change in raised:
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="terms",
                source=source,
                seq=change.seq,
                line=change.seq + 1,
                problem=f"the site raised its {change.raised}: {change.describe()}",
            )
        )
    if copy.terms_changes and not raised:
        collect.passed(
            site_id,
            "terms",
            f"{len(copy.terms_changes)} terms entr{'y' if len(copy.terms_changes) == 1 else 'ies'}"
            f"; now {copy.terms_changes[-1].after.describe()}; never a raised cap or delta",
        )


def check_libraries(*, site_id: str, eps: Epsilons, collect: Collector) -> None:
    """Opacus and dp-accounting agree at their shared integer orders; PLD is not above RDP."""
    gap = relative_difference(eps.dp_accounting_rdp_integer, eps.opacus_rdp_integer)
    shown = (
        f"Opacus RDP {fmt(eps.opacus_rdp)}, dp-accounting RDP {fmt(eps.dp_accounting_rdp)}, "
        f"PLD {fmt(eps.pld)} at delta {eps.delta:g}"
    )
    if eps.dp_accounting_rdp_integer == 0.0 < eps.opacus_rdp_integer:
        # dp-accounting's KL shortcut: every RDP value is below delta^2, so it answers 0 where
        # Opacus' conversion still adds its log(1/delta)/(alpha-1) term. Nothing to compare.
        collect.passed(
            site_id,
            "two libraries",
            f"{shown}; privacy loss below delta^2: dp-accounting's KL bound gives 0",
        )
    elif gap > INTEGER_ORDER_TOLERANCE:
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="accounting",
                problem=f"Opacus and dp-accounting disagree at the same integer orders: "
                f"{fmt(eps.opacus_rdp_integer, 12)} vs {fmt(eps.dp_accounting_rdp_integer, 12)} "
                f"(relative {gap:.2e} > {INTEGER_ORDER_TOLERANCE:g})",
            )
        )
    else:
        collect.passed(
            site_id,
            "two libraries",
            f"{shown}; at shared integer orders they agree to {gap:.1e}",
        )
    if eps.pld > eps.opacus_rdp * (1.0 + PLD_ABOVE_RDP_TOLERANCE):
        collect.findings.append(
            Finding(
                site_id=site_id,
                check="accounting",
                problem=f"PLD epsilon {fmt(eps.pld)} is above the RDP bound {fmt(eps.opacus_rdp)} "
                f"by more than {PLD_ABOVE_RDP_TOLERANCE:.0%}: one accountant is wrong",
            )
        )


def _report_distributed(site_id: str, eps: DistributedEpsilons, collect: Collector) -> None:
    """Both guarantees of the distributed-noise steps, recomputed, beside the enforced one."""
    collect.passed(
        site_id,
        "distributed noise",
        f"{len(eps.seqs)} distributed-noise reservation(s) (seq "
        f"{', '.join(map(str, eps.seqs))}): {eps.distributed_label} {fmt(eps.distributed)}, "
        f"{LOCAL_LABEL} {fmt(eps.local)} ({eps.accountant} at delta {eps.delta:g}); the "
        f"budget is enforced on the {eps.enforced_on}",
    )


def _check_cap(site: SiteAudit, collect: Collector) -> None:
    spent, terms = site.spent, site.terms
    if terms is None or spent is None:
        why = "no terms in the ledger" if terms is None else "no verified ledger to compute it from"
        collect.skipped(site.site_id, "cap", why)
        return
    if spent > terms.epsilon_cap:
        collect.findings.append(
            Finding(
                site_id=site.site_id,
                check="cap",
                problem=f"epsilon spent {fmt(spent)} ({terms.accountant} at delta "
                f"{terms.delta:g}) exceeds the site's cap {terms.epsilon_cap:g}",
            )
        )
    else:
        collect.passed(
            site.site_id,
            "cap",
            f"spent {fmt(spent)} ({terms.accountant}) <= cap {terms.epsilon_cap:g} at delta "
            f"{terms.delta:g}",
        )


def relative_source(*, workspace: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(workspace.root))
    except ValueError:
        return str(path)
