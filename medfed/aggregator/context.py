"""What one run of the round loop holds: the grid, the settings, the sites' records, the
budgets, the run's store; and the one way it reports what happens (:meth:`RunContext.emit`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.serverapp import Grid

from medfed.aggregator.budget import BudgetTracker
from medfed.aggregator.outcome import SiteRecord
from medfed.aggregator.run_store import RunStore
from medfed.aggregator.site_level_ledger import SiteLevelLedger
from medfed.config.run import RunSettings
from medfed.run_events import EventCallback, RunEvent, append_event
from medfed.workspace import Workspace

log = logging.getLogger("medfed.aggregator")


@dataclass
class RunContext:
    """The state of one run as the loop goes (the sites' records change round by round)."""

    grid: Grid
    settings: RunSettings
    workspace: Workspace
    store: RunStore
    tracker: BudgetTracker
    on_event: EventCallback | None
    receipt_key: Ed25519PrivateKey | None = None  # signs the sites' ledger receipts
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    site_level: SiteLevelLedger | None = None  # the run's central-DP ledger, when it has one

    @property
    def run_name(self) -> str:
        return self.settings.run_name

    def emit(self, event: RunEvent) -> None:
        """Record ``event`` in the run's events, log it, and pass it on."""
        append_event(self.store.paths.events, event)
        log.info("%s", event.describe())
        if self.on_event is not None:
            self.on_event(event)
