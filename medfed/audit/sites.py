"""One site's part of an audit: its key, its ledgers, its epsilon from two libraries, its cap."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.audit.accounting import (
    INTEGER_ORDER_TOLERANCE,
    PLD_ABOVE_RDP_TOLERANCE,
    Epsilons,
    recompute,
)
from medfed.audit.findings import Collector, Finding, fmt, ledger_finding, relative_difference
from medfed.audit.result import SiteAudit
from medfed.audit.runs import VerifiedCopy
from medfed.audit.sources import ledger_copy_path, read_cap
from medfed.errors import ConfigError, LedgerError
from medfed.privacy.accounting import compute_epsilon
from medfed.privacy.budget import BudgetCap
from medfed.privacy.ledger import LedgerReport, verify_ledger, verify_ledger_bytes
from medfed.privacy.storage import read_bytes
from medfed.transport.provision import Workspace


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
        cap=None,
        epsilons=None,
        site_ledger_epsilon=None,
    )
    try:
        public_key = workspace.ledger_public_key(site_id)
    except ConfigError as exc:
        collect.findings.append(Finding(site_id=site_id, check="key", problem=exc.message))
        return empty, None
    key = workspace.site(site_id).ledger_key_id
    path = ledger_copy_path(workspace_root=workspace.root, site_id=site_id)
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
    cap, why = read_cap(workspace_root=workspace.root, site_id=site_id)
    if cap is None and copy is not None and copy.entries:
        collect.findings.append(
            Finding(site_id=site_id, check="cap", problem=f"cannot check the budget: {why}")
        )
    delta = _delta(cap, copy, own)
    epsilons = (
        None if copy is None or delta is None else recompute(history=copy.history, delta=delta)
    )
    site_epsilon = None
    if own is not None and delta is not None:
        site_epsilon = compute_epsilon(history=own.history, delta=delta, accountant="rdp")
    if epsilons is not None:
        check_libraries(site_id=site_id, eps=epsilons, collect=collect)
    audit = SiteAudit(
        site_id=site_id,
        key_id=key,
        copy=copy,
        site_ledger=own,
        cap=cap,
        epsilons=epsilons,
        site_ledger_epsilon=site_epsilon,
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


def _delta(
    cap: BudgetCap | None, copy: LedgerReport | None, site: LedgerReport | None
) -> float | None:
    """The cap's delta; without a cap, the smallest delta the entries name (the strictest)."""
    if cap is not None:
        return cap.delta
    deltas = [r.delta for report in (copy, site) if report for r in report.reservations]
    return min(deltas) if deltas else None


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


def _check_cap(site: SiteAudit, collect: Collector) -> None:
    spent = site.spent
    if site.cap is None or spent is None:
        why = "no stored cap" if site.cap is None else "no verified ledger to compute it from"
        collect.skipped(site.site_id, "cap", why)
        return
    if spent > site.cap.epsilon:
        collect.findings.append(
            Finding(
                site_id=site.site_id,
                check="cap",
                problem=f"epsilon spent {fmt(spent)} (Opacus RDP at delta {site.cap.delta:g}) "
                f"exceeds the site's cap {site.cap.epsilon:g}",
            )
        )
    else:
        collect.passed(
            site.site_id,
            "cap",
            f"spent {fmt(spent)} <= cap {site.cap.epsilon:g} at delta {site.cap.delta:g}",
        )


def relative_source(*, workspace: Workspace, path: Path) -> str:
    try:
        return str(path.relative_to(workspace.root))
    except ValueError:
        return str(path)
