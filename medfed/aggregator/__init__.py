"""The aggregator: update validation and aggregation strategies.

Pure logic over numpy arrays; this package never imports MONAI, torch or training code.
"""

from medfed.aggregator.strategies import (
    AggregationResult,
    FedAdamState,
    StrategySettings,
    aggregate,
)
from medfed.aggregator.validation import Rejection, partition_updates, validate_update

__all__ = [
    "AggregationResult",
    "FedAdamState",
    "Rejection",
    "StrategySettings",
    "aggregate",
    "partition_updates",
    "validate_update",
]
