"""After a simulation: which virtual sites' privacy records hold, checked as an auditor would.

A site counts as verified when the auditor's checks of :func:`medfed.audit.sites.audit_site`
find nothing (the aggregator's copy and the site's own ledger verify against the key the
workspace registered, chain and signatures, the copy is the site's ledger or a prefix of it,
two accounting libraries agree, the spend is within the cap), and the epsilon the aggregator
tracked during the run (its summary) is the one recomputed here from the copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.transport.simulation_sites import VirtualSites


@dataclass(frozen=True)
class SiteCheck:
    """One site's verdict: ``problems`` is empty when everything held."""

    site_id: str
    epsilon: float | None
    epsilon_cap: float | None
    problems: tuple[str, ...]

    @property
    def verified(self) -> bool:
        return not self.problems


def verify_sites(*, sites: VirtualSites, summary: Mapping[str, Any]) -> list[SiteCheck]:
    """Check every virtual site of the run ``summary`` describes (see the module docstring)."""
    from medfed.audit.findings import Collector
    from medfed.audit.sites import audit_site
    from medfed.config import load_site_config

    tracked = dict(dict(summary.get("budgets") or {}).get("sites") or {})
    checks = []
    for site_id, config_path in zip(sites.site_ids, sites.configs, strict=True):
        collect = Collector()
        ledger = load_site_config(Path(config_path)).ledger_path
        if not ledger.is_file():
            checks.append(SiteCheck(site_id, None, None, ("the site has no privacy ledger",)))
            continue
        audit, _ = audit_site(
            workspace=sites.workspace, site_id=site_id, site_ledger=ledger, collect=collect
        )
        problems = [finding.one_line() for finding in collect.findings]
        spent, cap = audit.spent, None if audit.cap is None else audit.cap.epsilon
        if spent is None or cap is None or not spent <= cap:
            problems.append(f"epsilon {spent} is not within the cap {cap}")
        during = dict(tracked.get(site_id) or {}).get("epsilon_spent")
        if audit.epsilon is None or not isinstance(during, int | float):
            problems.append("the aggregator tracked no budget for the site")
        elif not math.isclose(float(during), audit.epsilon, rel_tol=1e-9):
            problems.append(
                f"the aggregator tracked epsilon {during}, its ledger copy gives {audit.epsilon}"
            )
        checks.append(
            SiteCheck(site_id=site_id, epsilon=spent, epsilon_cap=cap, problems=tuple(problems))
        )
    return checks
