"""The aggregator's ledger of site-level (central) DP: one entry per noisy aggregate released.

Site-level DP (:mod:`medfed.aggregator.central_dp`) protects a whole site, all of its patients
at once, and its mechanism runs at the aggregator, so its accounting lives there too, apart
from the sites' patient-level ledgers: a different unit, a different adjacency, and an epsilon
that must never be added to, compared with or shown as a patient-level one.

The ledger is the run's ``site_level_ledger.jsonl``. Each line is one Gaussian mechanism on the
clipped sum of the round's site updates (noise multiplier, clip norm, sample rate, the cohort
it averaged over), chained to the line before by SHA-256 so that an edited, dropped or
reordered line is caught when the ledger is read. A line is appended (fsynced, under a file
lock) *before* the noisy aggregate is computed: a crash can only over-count. As with the sites'
ledgers, epsilon is never stored: :meth:`SiteLevelLedger.epsilon` recomputes it from every
entry, composed in one RDP accountant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from medfed.errors import LedgerError
from medfed.privacy.accounting import (
    AccountantName,
    DPSteps,
    check_delta,
    compute_epsilon,
    conversion_of,
)
from medfed.privacy.events import GENESIS_HASH, canonical_json
from medfed.storage import append_line, locked, make_private_dirs, read_bytes

__all__ = ["LEDGER_NAME", "SiteLevelEntry", "SiteLevelLedger", "site_level_ledger_path"]

LEDGER_NAME: Final = "site_level_ledger.jsonl"
FORMAT: Final = 1
UNIT: Final = "site"
ADJACENCY: Final = "add/remove one site's update (zero-out) within the round's cohort"


def site_level_ledger_path(run_directory: Path) -> Path:
    """Where a run keeps its site-level ledger: beside its events, in the run's directory."""
    return Path(run_directory) / LEDGER_NAME


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteLevelEntry:
    """One release of a noisy aggregate: a Gaussian mechanism on the clipped sum of updates."""

    seq: int
    run_name: str
    round: int
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    cohort: int
    previous_sha256: str

    @property
    def steps(self) -> DPSteps:
        return DPSteps(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=1
        )

    def to_json(self) -> dict[str, Any]:
        return {"v": FORMAT, "unit": UNIT, "mechanism": "gaussian", **asdict(self)}


class SiteLevelLedger:
    """The append-only ledger of one run's site-level DP releases (see the module docstring)."""

    def __init__(self, *, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[SiteLevelEntry]:
        """Every entry, each checked against the chain.

        Raises:
            LedgerError: A line is unreadable, out of sequence or not chained to the one before.
        """
        with locked(self.path, exclusive=False):
            data = read_bytes(self.path)
        entries: list[SiteLevelEntry] = []
        previous = GENESIS_HASH
        for number, line in enumerate(data.splitlines(), start=1):
            entry = _entry(line, where=f"{self.path}:{number}")
            if entry.seq != len(entries) or entry.previous_sha256 != previous:
                raise LedgerError(
                    f"{self.path}:{number}: the entry is not the next link of the chain (seq "
                    f"{entry.seq}, expected {len(entries)})",
                    hint="the site-level ledger was edited; restore it from backup",
                )
            entries.append(entry)
            previous = hashlib.sha256(line).hexdigest()
        return entries

    def append(
        self,
        *,
        run_name: str,
        round: int,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        cohort: int,
    ) -> SiteLevelEntry:
        """Record one release (fsynced) before its noisy aggregate is computed."""
        DPSteps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1)
        make_private_dirs(self.path.parent)
        with locked(self.path, exclusive=True):
            data = read_bytes(self.path)
            lines = data.splitlines()
            previous = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS_HASH
            entry = SiteLevelEntry(
                seq=len(lines),
                run_name=run_name,
                round=round,
                noise_multiplier=float(noise_multiplier),
                clip_norm=float(clip_norm),
                sample_rate=float(sample_rate),
                cohort=int(cohort),
                previous_sha256=previous,
            )
            append_line(self.path, canonical_json(entry.to_json()))
        return entry

    def epsilon(self, *, delta: float, accountant: AccountantName = "rdp") -> float:
        """Site-level epsilon at ``delta`` of every release in the ledger, composed at once."""
        check_delta(delta)
        history = [entry.steps for entry in self.entries()]
        return compute_epsilon(history=history, delta=delta, accountant=accountant)

    def summary(self, *, delta: float, accountant: AccountantName = "rdp") -> dict[str, Any]:
        """What the run's summary says of its site-level DP: labelled as such, never merged
        with the patient-level budgets."""
        entries = self.entries()
        history = [entry.steps for entry in entries]
        epsilon = compute_epsilon(history=history, delta=delta, accountant=accountant)
        last = entries[-1] if entries else None
        return {
            "unit": UNIT,
            "adjacency": ADJACENCY,
            "site_level_epsilon": epsilon if epsilon != float("inf") else None,
            "delta": delta,
            "accountant": accountant,
            "conversion": conversion_of(accountant),
            "releases": len(entries),
            "noise_multiplier": None if last is None else last.noise_multiplier,
            "clip_norm": None if last is None else last.clip_norm,
            "ledger": str(self.path),
        }


def _entry(line: bytes, *, where: str) -> SiteLevelEntry:
    try:
        data = json.loads(line)
        if not isinstance(data, Mapping) or data.get("v") != FORMAT or data.get("unit") != UNIT:
            raise ValueError("not a site-level ledger entry of format 1")
        if canonical_json(data) != line:
            raise ValueError("not in canonical form")
        return SiteLevelEntry(
            seq=int(data["seq"]),
            run_name=str(data["run_name"]),
            round=int(data["round"]),
            noise_multiplier=float(data["noise_multiplier"]),
            clip_norm=float(data["clip_norm"]),
            sample_rate=float(data["sample_rate"]),
            cohort=int(data["cohort"]),
            previous_sha256=str(data["previous_sha256"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"{where}: unreadable site-level ledger entry ({exc})",
            hint="the site-level ledger was edited or cut; restore it from backup",
        ) from None
