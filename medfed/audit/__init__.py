"""Independent verification of a federation's privacy record, and the auditor's report.

``verify_workspace`` checks every site's signed ledger (the aggregator's copy, and any ledger a
site hands over) against the key registered in the workspace, recomputes epsilon with Opacus and
with Google's dp-accounting, and compares it with what the runs reported (``summary.json``,
MLflow) and with each site's cap. ``build_report`` turns that into a per-site privacy statement
(HTML, JSON or PDF). No MONAI, no training code, and nothing here writes to the workspace.
"""

from medfed.audit.accounting import Epsilons, recompute
from medfed.audit.findings import Check, Finding
from medfed.audit.report import AuditReport, build_report
from medfed.audit.runs import RunEpsilon
from medfed.audit.statement import SiteStatement
from medfed.audit.verify import AuditResult, SiteAudit, verify_workspace

__all__ = [
    "AuditReport",
    "AuditResult",
    "Check",
    "Epsilons",
    "Finding",
    "RunEpsilon",
    "SiteAudit",
    "SiteStatement",
    "build_report",
    "recompute",
    "verify_workspace",
]
