"""The aggregator: update validation, aggregation strategies and the sites' privacy budgets.

Pure logic over numpy arrays and the privacy ledger; this package never imports MONAI, torch
or training code.
"""

from medfed.aggregator.budget import BudgetTracker, SiteBudget
from medfed.aggregator.strategies import (
    AggregationResult,
    FedAdamState,
    aggregate,
)
from medfed.aggregator.validation import Rejection, partition_updates, validate_update

__all__ = [
    "AggregationResult",
    "BudgetTracker",
    "FedAdamState",
    "Rejection",
    "SiteBudget",
    "aggregate",
    "partition_updates",
    "validate_update",
]
