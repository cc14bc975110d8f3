"""Privacy accounting, the signed privacy ledger and the budget policy.

No MONAI and no training code here: sites, the aggregator and auditors all stand on this
package. Torch, Opacus and dp-accounting are imported only when an epsilon is computed.
"""

from medfed.privacy.accounting import (
    ACCOUNTANTS,
    AccountantName,
    DPSteps,
    compute_epsilon,
    conversion_of,
    noise_for_target_epsilon,
)
from medfed.privacy.budget import (
    BudgetCap,
    BudgetCheck,
    BudgetStatus,
    PrivacyTerms,
    budget_status,
    check_budget,
)
from medfed.privacy.events import (
    CommitEntry,
    LedgerEntry,
    ReleaseEntry,
    ReserveEntry,
    TermsEntry,
)
from medfed.privacy.keys import key_id, load_or_create_signing_key, load_public_key, public_key_path
from medfed.privacy.ledger import LedgerReport, ReservationState, TermsChange, verify_ledger
from medfed.privacy.sampling import SamplingPlan, plan_sampling
from medfed.privacy.site_ledger import (
    Release,
    Reservation,
    RoundPlan,
    SiteLedger,
    library_versions,
)

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "BudgetCap",
    "BudgetCheck",
    "BudgetStatus",
    "CommitEntry",
    "DPSteps",
    "LedgerEntry",
    "LedgerReport",
    "PrivacyTerms",
    "Release",
    "ReleaseEntry",
    "Reservation",
    "ReservationState",
    "ReserveEntry",
    "RoundPlan",
    "SamplingPlan",
    "SiteLedger",
    "TermsChange",
    "TermsEntry",
    "budget_status",
    "check_budget",
    "compute_epsilon",
    "conversion_of",
    "key_id",
    "library_versions",
    "load_or_create_signing_key",
    "load_public_key",
    "noise_for_target_epsilon",
    "plan_sampling",
    "public_key_path",
    "verify_ledger",
]
