"""What ``medfed audit trace`` found: the run's round records, each site's spend, the findings.

Built by :func:`medfed.audit.trace.trace_model`; printed as lines (one ``FINDING`` per broken
link, then ``PASS`` or ``FAIL``) or as one JSON object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfed.audit.findings import fmt


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceFinding:
    """One broken link: the round and site it is about (None: the model or the whole run)."""

    problem: str
    round: int | None = None
    site_id: str | None = None

    def line(self) -> str:
        where = " ".join(
            part
            for part in (
                "" if self.round is None else f"round {self.round}",
                "" if self.site_id is None else f"site {self.site_id}",
            )
            if part
        )
        return f"FINDING {where + ': ' if where else ''}{self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "site_id": self.site_id, "problem": self.problem}


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSpend:
    """What one site's ledger says the traced model cost, through seq ``last_seq``."""

    site_id: str
    ledger: str
    last_seq: int
    accountant: str
    delta: float
    epsilon: float
    epsilons: dict[str, Any]

    def line(self) -> str:
        return (
            f"site {self.site_id}: epsilon {fmt(self.epsilon)} ({self.accountant}, delta "
            f"{self.delta:g}) through ledger seq {self.last_seq} of {self.ledger}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceResult:
    """The walk from one model to the ledger entries behind it.

    ``head`` is the hash of the run's final round record; ``rounds`` the records as stored.
    """

    model: str
    run_name: str
    model_sha256: str | None
    head: str | None
    rounds: tuple[Mapping[str, Any], ...]
    spends: tuple[SiteSpend, ...]
    findings: tuple[TraceFinding, ...]

    @property
    def passed(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        out = [
            f"model {self.model}: run {self.run_name!r}, weights {short(self.model_sha256)}, "
            f"chain head {short(self.head)}"
        ]
        for record in self.rounds:
            sites = ", ".join(
                f"{site} update {short(item.get('update_sha256'))} commit seq "
                f"{item.get('commit_seq')}"
                for site, item in sorted(as_mapping(record.get("updates")).items())
            )
            start = record.get("start_sha256")
            made = short(record.get("global_sha256"))
            out.append(
                f"round {record.get('round')}: "
                + (f"initial model {made}" if start is None else f"{short(start)} -> {made}")
                + (f"; {sites}" if sites else "")
            )
        out += [spend.line() for spend in self.spends]
        out += [finding.line() for finding in self.findings]
        out.append("PASS" if self.passed else f"FAIL ({len(self.findings)} finding(s))")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "run_name": self.run_name,
            "model_sha256": self.model_sha256,
            "head": self.head,
            "passed": self.passed,
            "rounds": [dict(record) for record in self.rounds],
            "sites": {
                s.site_id: {
                    "ledger": s.ledger,
                    "last_seq": s.last_seq,
                    "accountant": s.accountant,
                    "delta": s.delta,
                    "epsilon": s.epsilon,
                    "epsilons": s.epsilons,
                }
                for s in self.spends
            },
            "findings": [f.to_json() for f in self.findings],
        }


def as_mapping(value: object) -> Mapping[str, Any]:
    """A record's mapping field, or an empty one where a damaged record has something else."""
    return value if isinstance(value, Mapping) else {}


def short(value: object) -> str:
    """A digest as printed: its first 12 hex digits."""
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 12 else str(value)
