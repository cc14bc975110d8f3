"""A synthetic federation run: the events `run_federation` emits and the files its finish step
leaves, as it writes them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from event_support import write_event

from medfed.aggregator.finish import write_report
from medfed.aggregator.run_store import RunStore
from medfed.config.run import RunSettings
from medfed.run_events import RunEvent
from medfed.workspace import WorkspaceLayout

SITES = ("site-a", "site-b")
CAPS = {"site-a": 8.0, "site-b": 6.0}
ROUNDS = 2


@dataclass(frozen=True)
class FakeRun:
    """A run directory whose events are written as the real round loop writes them."""

    workspace: Path
    run_dir: Path
    settings: RunSettings
    store: RunStore
    checkpoint: Path

    def emit(self, kind: str, **fields: Any) -> RunEvent:
        return write_event(self.store.paths.events, kind, run_name=self.settings.run_name, **fields)

    def finish(self, *, summary: dict[str, Any] | None) -> None:
        """What the aggregator's finish step writes before the last event."""
        if summary is not None:
            self.store.write_summary(summary)
        write_report(
            layout=WorkspaceLayout(root=self.workspace),
            run_name=self.settings.run_name,
            sites=SITES,
            budget_state=self.summary()["budgets"],
        )

    def epsilon(self, site: str, round_index: int) -> float:
        return (0.9 if site == "site-a" else 1.3) * round_index

    def events(self, *, last: str = "run_finished") -> Iterator[RunEvent]:
        """run_started .. ``last``: two rounds of two sites, then the final evaluation."""
        yield self.emit(
            "run_started",
            resume_from=None,
            rounds=ROUNDS,
            sites=list(SITES),
            settings=self.settings.model_dump(mode="json"),
        )
        yield self.emit("sites_online", online=list(SITES), missing=[])
        sent = received = 0
        for round_index in range(1, ROUNDS + 1):
            yield self.emit("round_started", round=round_index, sites=list(SITES))
            for index, site in enumerate(SITES):
                yield self.emit(
                    "site_update",
                    site=site,
                    round=round_index,
                    patients=10 + index,
                    loss=1.0 / round_index + index,
                    dice_before=0.1 * round_index + 0.01 * index,
                    releases={
                        "loss": {"mechanism": "dp-sgd", "noise_std": 0.25, "seq": 4},
                        "patients": {"mechanism": "public", "noise_std": None, "seq": 1},
                        # site-b withheld its Dice: no mechanism to name
                        **(
                            {}
                            if index
                            else {"dice_before": {"mechanism": "gaussian", "noise_std": 0.2}}
                        ),
                    },
                    epsilon_spent=self.epsilon(site, round_index),
                    epsilon_cap=CAPS[site],
                    delta=1e-5,
                    accountant="rdp",
                )
            sent += 1000 * round_index
            received += 500 * round_index
            yield self.emit(
                "round_done",
                round=round_index,
                sites_answered=2,
                sites_asked=2,
                dice_before=0.1 * round_index,
                loss=0.5 / round_index,
                seconds=2.0 + round_index,
                bytes_sent=sent,
                bytes_received=received,
                epsilon={s: self.epsilon(s, round_index) for s in SITES},
            )
        if last == "run_failed":
            self.finish(summary=None)
            yield self.emit("run_failed", reason="something broke")
            return
        yield self.emit("site_timeout", site="site-b", round=ROUNDS + 1, message_type="evaluate")
        yield self.emit("evaluation", round=ROUNDS, dice=0.42, sites={"site-a": 0.42})
        self.finish(summary=self.summary())
        yield self.emit(last, reason="all rounds done", summary=self.summary())

    def summary(self) -> dict[str, Any]:
        budgets = {
            "ledger_copies": str(self.workspace / "ledgers"),
            "sites": {
                site: {
                    "site_id": site,
                    "epsilon_spent": self.epsilon(site, ROUNDS),
                    "epsilon_cap": CAPS[site],
                    "delta": 1e-5,
                    "accountant": "rdp",
                }
                for site in SITES
            },
            "sites_without_cap": {},
        }
        return {
            "run_name": self.settings.run_name,
            "status": "finished",
            "reason": "all rounds done",
            "rounds_completed": ROUNDS,
            "dice_initial": 0.1,
            "dice_final": 0.42,
            "model": str(self.checkpoint),
            "sites": [
                {"site_id": s, "rounds": ROUNDS, "epsilon_spent": self.epsilon(s, ROUNDS)}
                for s in SITES
            ],
            "budgets": budgets,
        }
