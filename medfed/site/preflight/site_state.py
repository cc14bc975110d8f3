"""What the node keeps on disk: the dataset, the privacy ledger and its budget, free space."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medfed.config.site import SiteConfig
from medfed.errors import MedfedError
from medfed.privacy.ledger import LedgerReport
from medfed.site.ledger_of import ledger_of
from medfed.site.preflight.result import CheckResult, _fail, _pass, _warn

BUDGET_WARN_FRACTION = 0.10
DEFAULT_MIN_FREE_BYTES = 5 * 1024**3


def check_data(config: SiteConfig) -> CheckResult:
    """The `medfed data check` report, summed up (no patient file paths in the line)."""
    from medfed.data.validate import CheckSettings, check_dataset

    name = "dataset"
    fix = "run `medfed data check --config SITE.yaml` for the full list and fix the export"
    try:
        report = check_dataset(
            manifest=config.data.manifest, settings=CheckSettings.of(config.data)
        )
    except MedfedError as exc:
        return _fail(name, exc.message.splitlines()[0], exc.hint or fix)
    if report.n_cases == 0:
        return _fail(name, "the manifest lists no cases", "add the site's cases to the manifest")
    if not report.ok:
        first = next(p for p in report.problems if p.severity == "error")
        return _fail(
            name,
            f"{report.n_bad} of {report.n_cases} cases bad (first: {first.patient_id}: "
            f"{first.message})",
            fix,
        )
    if report.n_warnings:
        return _warn(
            name,
            f"{report.n_cases} cases, {report.n_warnings} warning(s)",
            fix.replace("fix", "read"),
        )
    return _pass(name, f"{report.n_cases} cases checked, no problems")


def check_ledger(config: SiteConfig) -> list[CheckResult]:
    """The ledger's signature chain and witness, then the budget left under the site's cap."""
    try:
        ledger = ledger_of(config)
        report = ledger.verify()
    except MedfedError as exc:
        failed = _fail("ledger", exc.message, exc.hint or "restore the ledger from backup")
        return [
            failed,
            _fail("privacy budget", "unknown: the ledger does not verify", "fix the ledger first"),
        ]
    entries = len(report.entries)
    ledger_line = _pass(
        "ledger",
        f"{config.ledger_path}: {entries} entries, chain and signatures verified"
        if entries
        else f"{config.ledger_path}: empty (no round trained yet)",
    )
    cap = config.terms.cap
    try:
        status = ledger.status(terms=config.terms)
    except MedfedError as exc:
        return [ledger_line, _fail("privacy budget", exc.message, exc.hint or "")]
    spent = f"epsilon {status.spent:.3g} of {cap.epsilon:g} spent (delta {cap.delta:g})"
    if status.exhausted:
        budget = _fail(
            "privacy budget",
            f"{spent}: exhausted, every round will be refused",
            "nothing to fix on the node: the site's data has given all it agreed to",
        )
    elif status.remaining < BUDGET_WARN_FRACTION * cap.epsilon:
        budget = _warn(
            "privacy budget",
            f"{spent}: {status.remaining:.3g} left (under {BUDGET_WARN_FRACTION:.0%})",
            "tell the federation: few rounds are left before the cap",
        )
    else:
        budget = _pass("privacy budget", f"{spent}, {status.remaining:.3g} left")
    return [ledger_line, budget, _terms_line(config, report)]


def check_witness(config: SiteConfig) -> CheckResult:
    """Whether a restored old ledger would be caught (the ledger check verifies against it)."""
    try:
        ledger = ledger_of(config)
    except MedfedError as exc:
        return _fail("head witness", exc.message, exc.hint or "")
    if ledger.witness is None:
        return _warn(
            "head witness",
            "none: a restored old copy of the ledger would verify",
            "set paths.head_witness to a directory on another volume, then run "
            "`medfed privacy witness --config SITE.yaml`",
        )
    if not ledger.witness.path.exists():
        return _warn(
            "head witness",
            f"{ledger.witness.path}: not recorded yet",
            "run `medfed privacy witness --config SITE.yaml` (the first round records it too)",
        )
    return _pass("head witness", f"{ledger.witness.path}: kept with every ledger entry")


def check_receipt(config: SiteConfig) -> CheckResult:
    """The aggregator's receipt the site keeps (the ledger check verifies against it)."""
    name = "aggregator receipt"
    try:
        ledger = ledger_of(config)
        receipts = ledger.receipts
        stored = None if receipts is None else receipts.load()
    except MedfedError as exc:
        return _fail(name, exc.message, exc.hint or "")
    if receipts is None:
        return _warn(
            name,
            "no receipt key: the aggregator's receipts are not checked",
            "set transport.receipt_public_key to the aggregator_receipt.pub of the site's kit",
        )
    if stored is None:
        return _pass(name, "none kept yet: the next federated round's request brings one")
    return _pass(
        name,
        f"{receipts.path}: the aggregator holds {stored.count} entries; checked before every round",
    )


def _terms_line(config: SiteConfig, report: LedgerReport) -> CheckResult:
    """The configured terms against the ledger's: a larger delta would be refused."""
    name = "privacy terms"
    wanted, held = config.terms, report.terms
    floor = held.delta if held is not None else report.legacy_delta
    if floor is not None and wanted.delta > floor:
        return _fail(
            name,
            f"privacy.delta {wanted.delta:g} is larger than the ledger's {floor:g}: every round "
            "will be refused",
            f"set privacy.delta to {floor:g} or lower",
        )
    if held is None:
        return _pass(name, f"{wanted.describe()}: written into the ledger with the first entry")
    if held != wanted:
        return _warn(
            name,
            f"the config says {wanted.describe()}, the ledger {held.describe()}",
            "the next round records the config's terms in the ledger; the aggregator and the "
            "auditors see a raised cap",
        )
    return _pass(name, f"{held.describe()}, as the ledger records them")


def check_disk(workdir: Path, *, min_free_bytes: int) -> CheckResult:
    """Free space where the work directory is (and that the node can write there)."""
    name = "disk"
    existing = workdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        return _fail(
            name,
            f"{existing} is not writable by this user",
            "run the node as the user that owns the work directory (paths.workdir)",
        )
    free = shutil.disk_usage(existing).free
    detail = f"{_gib(free)} free at {existing}"
    if free < min_free_bytes:
        return _warn(
            name,
            f"{detail} (under {_gib(min_free_bytes)})",
            "free space there or move paths.workdir: cache, checkpoints and logs grow",
        )
    return _pass(name, detail)


def _gib(value: int) -> str:
    return f"{value / 1024**3:.1f} GiB"
