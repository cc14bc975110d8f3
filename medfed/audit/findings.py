"""What an audit reports: findings (something that does not hold) and checks (what was looked at).

A finding names the site, the file and the ledger entry (line and seq) where that applies, and
what is wrong; a check records that something was verified, or skipped and why. The verdict is
PASS only when there is no finding; a skipped check is never a failure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

CheckStatus = Literal["pass", "skipped"]  # what does not hold is a Finding, not a check

# The place medfed.privacy.ledger names in its errors: "<source>: line N (seq S): <problem>".
_LEDGER_PLACE: Final = re.compile(r": line (\d+)(?: \(seq (\d+)\))?: ")


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One thing that does not hold."""

    site_id: str | None
    check: str
    problem: str
    source: str | None = None
    line: int | None = None
    seq: int | None = None

    def one_line(self) -> str:
        """``site-a: ledger copy line 3 (seq 2): bad signature ...`` (what the CLI prints)."""
        parts = [f"site {self.site_id}" if self.site_id else "workspace"]
        if self.source:
            parts.append(self.source)
        if self.line is not None:
            place = f"line {self.line}"
            if self.seq is not None:
                place += f" (seq {self.seq})"
            parts.append(place)
        return f"FINDING [{self.check}] {': '.join(parts)}: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "check": self.check,
            "source": self.source,
            "line": self.line,
            "seq": self.seq,
            "problem": self.problem,
            "text": self.one_line(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One verification that passed or was skipped (and why), with a short detail."""

    site_id: str | None
    name: str
    status: CheckStatus
    detail: str

    def one_line(self) -> str:
        who = f"site {self.site_id}" if self.site_id else "workspace"
        return f"{self.status.upper():7s} {self.name} ({who}): {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
        }


def ledger_finding(*, site_id: str, check: str, source: str, message: str) -> Finding:
    """A finding from a :class:`~medfed.errors.LedgerError` message, with its line and seq.

    The ledger verifier stops at the first entry that does not hold and names it as
    ``line N (seq S)``; that place becomes the finding's ``line`` and ``seq``.
    """
    matches = list(_LEDGER_PLACE.finditer(message))
    if not matches:
        problem = message.split(": ", 1)[1] if message.startswith(source) else message
        return Finding(site_id=site_id, check=check, source=source, problem=problem)
    place = matches[-1]
    seq = place.group(2)
    return Finding(
        site_id=site_id,
        check=check,
        source=source,
        line=int(place.group(1)),
        seq=None if seq is None else int(seq),
        problem=message[place.end() :],
    )


def relative_difference(value: float, reference: float) -> float:
    """|value - reference| / |reference| (0 when both are equal, inf when only one is inf)."""
    if value == reference:
        return 0.0
    if not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / max(abs(reference), 1e-300)


def fmt(value: float | None, digits: int = 6) -> str:
    """A number for people: ``inf`` and missing values spelled out."""
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


@dataclass(slots=True)
class Collector:
    """Findings and checks as an audit goes (mutable; becomes an AuditResult)."""

    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def passed(self, site_id: str | None, name: str, detail: str) -> None:
        self.checks.append(Check(site_id=site_id, name=name, status="pass", detail=detail))

    def skipped(self, site_id: str | None, name: str, detail: str) -> None:
        self.checks.append(Check(site_id=site_id, name=name, status="skipped", detail=detail))
