"""A small real federation record for the audit tests: no training, real signed ledgers.

A provisioned workspace with two sites; each site's ledger is written by ``SiteLedger`` with
the ledger key from its kit, and fed to the aggregator's ``BudgetTracker`` exactly as replies
are, so the copies are the real ones (with the sites' terms: accountant, delta and cap). A run
directory gets the summary and events the round loop would write.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.aggregator.budget import BudgetTracker
from medfed.privacy import BudgetCap, PrivacyTerms, Release, RoundPlan, SiteLedger
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace, load_workspace

SITES = ("site-a", "site-b")
DELTA = 1e-5
CAP = BudgetCap(epsilon=8.0, delta=DELTA)
TERMS = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=CAP.epsilon)
SAMPLE_RATE = 0.25
NOISE = 1.1
STEPS = 4
PATIENTS = 16


@dataclass(frozen=True)
class Federation:
    """A workspace root and the sites' own ledgers next to it."""

    root: Path

    @property
    def workspace_dir(self) -> Path:
        return self.root / "workspace"

    @property
    def workspace(self) -> Workspace:
        return load_workspace(self.workspace_dir)

    def site_ledger(self, site_id: str) -> SiteLedger:
        return SiteLedger(
            path=self.root / "sites" / site_id / "ledger.jsonl",
            key_path=self.workspace_dir / "sites" / site_id / "ledger_key.pem",
            site_id=site_id,
        )

    def copy_path(self, site_id: str) -> Path:
        return self.workspace_dir / "ledgers" / f"{site_id}.ledger.jsonl"

    def tracker(self) -> BudgetTracker:
        ws = self.workspace
        return BudgetTracker(
            directory=ws.root / "ledgers",
            public_keys={site: ws.ledger_public_key(site) for site in SITES},
        )

    def train(
        self,
        site_id: str,
        *,
        run: str,
        round_: int,
        steps: int = STEPS,
        noise: float = NOISE,
        commit: bool = True,
    ) -> None:
        """One round at the site (reserve, commit) and its reply reaching the aggregator."""
        ledger = self.site_ledger(site_id)
        plan = RoundPlan(
            run_id=run,
            round=round_,
            planned_rounds=10,
            steps=steps,
            sample_rate=SAMPLE_RATE,
            noise_multiplier=noise,
            max_grad_norm=1.0,
        )
        reservation = ledger.reserve(plan=plan, terms=TERMS)
        if commit:
            ledger.commit(reservation, steps=steps)
        self.send(site_id)

    def change_terms(self, site_id: str, terms: PrivacyTerms) -> None:
        """The site adopts ``terms`` (with a public release, which the cap does not check)."""
        self.site_ledger(site_id).release(
            release=Release(
                run_id="terms-change",
                round=0,
                quantity="patients",
                values={"train": PATIENTS, "validation": 4},
                mechanism="public",
                reason="the counts of the test federation",
            ),
            terms=terms,
        )
        self.send(site_id)

    def send(self, site_id: str) -> None:
        """The site's ledger lines the aggregator lacks, received as with a reply."""
        tracker = self.tracker()
        known = tracker.known_entries(site_id)
        path = self.site_ledger(site_id).path
        lines = path.read_text(encoding="ascii").splitlines()[known:]
        tracker.receive(site_id=site_id, first_seq=known, lines=lines)

    def finish_run(self, run: str, *, rounds: int) -> Path:
        """Write the run's events and summary as the round loop does at its end."""
        tracker = self.tracker()
        budgets = tracker.state_json()
        directory = self.workspace_dir / "runs" / run
        directory.mkdir(parents=True, exist_ok=True)
        events = [{"event": "run_started", "run_name": run}]
        for round_ in range(1, rounds + 1):
            for site in SITES:
                events.append(
                    {
                        "event": "site_update",
                        "run_name": run,
                        "site": site,
                        "round": round_,
                        "dice_before": 0.1 * round_,
                        "epsilon_spent": budgets["sites"][site]["epsilon_spent"],
                    }
                )
        with (directory / "events.jsonl").open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(event) + "\n" for event in events)
        (directory / "settings.json").write_text(
            json.dumps({"run_name": run, "noise_multiplier": NOISE, "rounds": rounds})
        )
        rows: list[dict[str, Any]] = [
            {
                "site_id": site,
                "rounds": rounds,
                "epsilon_spent": budgets["sites"][site]["epsilon_spent"],
                "epsilon_cap": budgets["sites"][site]["epsilon_cap"],
                "delta": DELTA,
            }
            for site in SITES
        ]
        summary = {"run_name": run, "status": "finished", "sites": rows, "budgets": budgets}
        path = directory / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        return path


def build_federation(root: Path) -> Federation:
    """Two sites, one run ``run-1`` of two rounds each."""
    provision_workspace(out=root / "workspace", sites=list(SITES), host="127.0.0.1")
    federation = Federation(root=root)
    for round_ in (1, 2):
        for site in SITES:
            federation.train(site, run="run-1", round_=round_)
    federation.finish_run("run-1", rounds=2)
    return federation


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
