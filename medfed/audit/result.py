"""The outcome of an audit: what was established per site, the findings and the checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.audit.accounting import LOCAL_LABEL, DistributedEpsilons, Epsilons
from medfed.audit.findings import Check, Finding, fmt
from medfed.audit.runs import RunEpsilon
from medfed.numbers import finite_or_none
from medfed.privacy.budget import BudgetCap, PrivacyTerms
from medfed.privacy.ledger import LedgerReport


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteAudit:
    """What the audit established about one site."""

    site_id: str
    key_id: str | None
    copy: LedgerReport | None
    site_ledger: LedgerReport | None
    terms: PrivacyTerms | None
    epsilons: Epsilons | None
    epsilon: float | None  # the copy's, with the ledger's own accountant at its delta
    site_ledger_epsilon: float | None
    runs: tuple[RunEpsilon, ...] = ()
    # Only for a ledger with distributed-noise steps: the epsilon of each guarantee.
    distributed: DistributedEpsilons | None = None

    @property
    def cap(self) -> BudgetCap | None:
        return None if self.terms is None else self.terms.cap

    @property
    def accountant(self) -> str:
        return "rdp" if self.terms is None else self.terms.accountant

    @property
    def spent(self) -> float | None:
        """Epsilon spent with the ledger's accountant: the larger of copy's and site's own."""
        values = [v for v in (self.epsilon, self.site_ledger_epsilon) if v is not None]
        return max(values) if values else None

    def one_line(self) -> str:
        """``site site-a: 4 entries; epsilon ... at delta ...; cap ...``."""
        if self.copy is None:
            return f"site {self.site_id}: ledger copy does not verify; epsilon not recomputed"
        text = f"site {self.site_id}: {len(self.copy.entries)} entries"
        eps = self.epsilons
        if eps is not None:
            text += (
                f"; epsilon {fmt(eps.opacus_rdp)} (Opacus RDP), {fmt(eps.dp_accounting_rdp)} "
                f"(dp-accounting RDP), {fmt(eps.pld)} (PLD) at delta {eps.delta:g}"
            )
        if self.site_ledger is not None:
            text += f"; site ledger {len(self.site_ledger.entries)} entries"
        if self.distributed is not None:
            d = self.distributed
            text += (
                f"; {d.distributed_label} {fmt(d.distributed)}, {LOCAL_LABEL} {fmt(d.local)}, "
                f"budget enforced on the {d.enforced_on}"
            )
        if self.terms is None:
            return text + "; no terms"
        return (
            text + f"; {self.terms.accountant} {fmt(self.spent)} of cap {self.terms.epsilon_cap:g}"
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            "site_id": self.site_id,
            "key_id": self.key_id,
            "copy_entries": None if self.copy is None else len(self.copy.entries),
            "site_ledger_entries": None
            if self.site_ledger is None
            else len(self.site_ledger.entries),
            "epsilon_cap": None if self.cap is None else self.cap.epsilon,
            "delta": None if self.epsilons is None else self.epsilons.delta,
            "accountant": self.accountant,
            "epsilon_spent": finite_or_none(self.spent),
            "epsilon": None if self.epsilons is None else self.epsilons.to_json(),
            "site_ledger_epsilon": finite_or_none(self.site_ledger_epsilon),
            "runs": [run.to_json() for run in self.runs],
        }
        if self.distributed is not None:
            data["distributed_epsilon"] = self.distributed.to_json()
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class RunMode:
    """Under which aggregation a run's guarantees were given, from its settings.

    ``secure_aggregation``: the aggregator saw only the sum of the sites' updates;
    ``distributed_sites``: with distributed noise, the noise shares each site counted on (None:
    each site added all of its noise); ``site_level``: site-level DP at the aggregator on top.
    None where the run's settings do not say (a run from before they did).
    """

    run_name: str
    secure_aggregation: bool | None
    distributed_sites: int | None
    site_level: bool

    def describe(self) -> str:
        if self.secure_aggregation is None:
            aggregation = "not recorded"
        elif self.secure_aggregation:
            aggregation = "secure aggregation (the aggregator saw only the sum)"
        else:
            aggregation = "plain (the aggregator saw each site's update)"
        noise = (
            "each site's own"
            if self.distributed_sites is None
            else f"distributed over {self.distributed_sites} sites' shares: the distributed "
            "epsilon holds while secure aggregation and those sites hold, the local one otherwise"
        )
        extra = "; site-level DP at the aggregator" if self.site_level else ""
        return f"aggregation {aggregation}; noise {noise}{extra}"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "secure_aggregation": self.secure_aggregation,
            "distributed_noise_sites": self.distributed_sites,
            "site_level_dp": self.site_level,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditResult:
    """Everything ``medfed audit verify`` reports."""

    workspace: Path
    run_names: tuple[str, ...]
    sites: tuple[SiteAudit, ...]
    findings: tuple[Finding, ...]
    checks: tuple[Check, ...]
    run_modes: tuple[RunMode, ...] = ()

    @property
    def passed(self) -> bool:
        """True only when nothing was found (skipped checks are no failure)."""
        return not self.findings

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def site(self, site_id: str) -> SiteAudit:
        for site in self.sites:
            if site.site_id == site_id:
                return site
        raise KeyError(site_id)

    def lines(self, *, verbose: bool = False) -> list[str]:
        """The text report: one line per finding, the checks when ``verbose``, the verdict."""
        out = [finding.one_line() for finding in self.findings]
        out += [f"run {mode.run_name}: {mode.describe()}" for mode in self.run_modes]
        out += [site.one_line() for site in self.sites]
        checks = self.checks if verbose else [c for c in self.checks if c.status != "pass"]
        out += [check.one_line() for check in checks]
        passed = sum(1 for c in self.checks if c.status == "pass")
        skipped = sum(1 for c in self.checks if c.status == "skipped")
        out.append(
            f"{self.verdict}: {len(self.findings)} finding(s), {passed} check(s) passed, "
            f"{skipped} skipped; {len(self.sites)} site(s), run(s): "
            f"{', '.join(self.run_names) or 'none'}"
        )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "verdict": self.verdict,
            "passed": self.passed,
            "runs": list(self.run_names),
            "run_modes": [mode.to_json() for mode in self.run_modes],
            "findings": [f.to_json() for f in self.findings],
            "checks": [c.to_json() for c in self.checks],
            "sites": {s.site_id: s.to_json() for s in self.sites},
        }
