"""Results of ``medfed audit canary`` (one-run empirical privacy audits) for the report.

A site writes each result to ``WORKDIR/audit/canary-<stamp>.json`` (schema
``medfed.canary-audit/1``). The auditor hands result files over by name, and the report also
picks up those beside every site ledger it was given (the ledger's folder is the site's
workdir). A named file that is not a result is the auditor's mistake: one ConfigError naming
it. A malformed file found beside a ledger is the site's record: it becomes a finding, so the
report is still written. A violated result is a finding too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.audit.findings import Check, Finding, fmt
from medfed.errors import ConfigError
from medfed.privacy.one_run_audit import RESULT_SCHEMA

CHECK: Final = "canary-audit"
HONEST: Final = "not violated: the audit found no more privacy loss than claimed"
LOWER_BOUND_NOTE: Final = (
    "A one-run audit gives a lower bound on epsilon, so 'not violated' is evidence against "
    "gross bugs (noise removed, clipping off, sample rate under-reported), not a proof of the "
    "claim."
)
_NUMBERS: Final = ("claimed_epsilon", "empirical_epsilon_lower_bound", "confidence")
_COUNTS: Final = ("canaries", "guesses", "correct")
_TEXTS: Final = ("site_id", "run_id", "created", "score")


class CanaryFileError(ValueError):
    """A file that is not a canary audit result; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CanaryAudit:
    """One canary audit result, as read from its file."""

    source: Path
    site_id: str
    run_id: str
    created: str
    score: str
    claimed_epsilon: float
    lower_bound: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    document: Mapping[str, Any]

    @property
    def violated(self) -> bool:
        return self.lower_bound > self.claimed_epsilon

    def verdict(self) -> str:
        if not self.violated:
            return HONEST
        return (
            f"VIOLATED: the empirical lower bound {fmt(self.lower_bound)} at confidence "
            f"{fmt(self.confidence)} exceeds the claimed epsilon {fmt(self.claimed_epsilon)}: "
            "the site's DP-SGD path leaks more than its ledger records"
        )

    def rows(self) -> list[tuple[str, str]]:
        """The result as (item, value) rows of the report's table."""
        return [
            ("claimed epsilon (the audit run's own)", fmt(self.claimed_epsilon)),
            (
                f"empirical lower bound at confidence {fmt(self.confidence)}",
                fmt(self.lower_bound),
            ),
            ("canaries", str(self.canaries)),
            ("correct guesses / guesses", f"{self.correct} / {self.guesses}"),
            ("score kind", self.score),
            ("date", self.created),
            ("audit run", self.run_id),
            ("result file", str(self.source)),
        ]

    def finding(self) -> Finding | None:
        if not self.violated:
            return None
        return Finding(
            site_id=self.site_id, check=CHECK, source=str(self.source), problem=self.verdict()
        )

    def check(self) -> Check | None:
        if self.violated:
            return None
        return Check(
            site_id=self.site_id,
            name=CHECK,
            status="pass",
            detail=f"lower bound {fmt(self.lower_bound)} <= claimed epsilon "
            f"{fmt(self.claimed_epsilon)} ({self.correct}/{self.guesses} correct; {self.source})",
        )

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "violated": self.violated, **self.document}


def read_canary_audit(path: Path) -> CanaryAudit:
    """The result in ``path``; :class:`CanaryFileError` says why it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CanaryFileError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise CanaryFileError("not a JSON object")
    if data.get("schema") != RESULT_SCHEMA:
        raise CanaryFileError(f"schema {data.get('schema')!r}, not {RESULT_SCHEMA!r}")
    problems = [f"{key} (a finite number)" for key in _NUMBERS if not _is_number(data.get(key))] + [
        f"{key} (a whole number >= 0)"
        for key in _COUNTS
        if not (type(data.get(key)) is int and data[key] >= 0)
    ]
    problems += [f"{key} (text)" for key in _TEXTS if not isinstance(data.get(key), str)]
    if problems:
        raise CanaryFileError(f"missing or invalid: {', '.join(problems)}")
    if data["correct"] > data["guesses"]:
        raise CanaryFileError(f"correct {data['correct']} > guesses {data['guesses']}")
    return CanaryAudit(
        source=path,
        site_id=data["site_id"],
        run_id=data["run_id"],
        created=data["created"],
        score=data["score"],
        claimed_epsilon=float(data["claimed_epsilon"]),
        lower_bound=float(data["empirical_epsilon_lower_bound"]),
        confidence=float(data["confidence"]),
        canaries=data["canaries"],
        guesses=data["guesses"],
        correct=data["correct"],
        document=data,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def collect_canary_audits(
    *, named: Iterable[Path], site_ledgers: Mapping[str, Path] | None
) -> tuple[tuple[CanaryAudit, ...], tuple[Finding, ...]]:
    """The named results and those beside the site ledgers, each file once, oldest first.

    A named file that is no result raises :class:`ConfigError`; a malformed file found beside
    a ledger is returned as a finding.
    """
    found: dict[Path, CanaryAudit] = {}
    findings: list[Finding] = []
    for path in named:
        try:
            found[path.resolve()] = read_canary_audit(path)
        except CanaryFileError as exc:
            raise ConfigError(
                f"--canary {path}: not a canary audit result: {exc}",
                hint="name a WORKDIR/audit/canary-<stamp>.json written by `medfed audit canary`",
            ) from exc
    for site_id, ledger in sorted((site_ledgers or {}).items()):
        for path in sorted(ledger.parent.joinpath("audit").glob("canary-*.json")):
            if path.resolve() in found or not path.is_file():
                continue
            try:
                found[path.resolve()] = read_canary_audit(path)
            except CanaryFileError as exc:
                findings.append(
                    Finding(
                        site_id=site_id,
                        check=CHECK,
                        source=str(path),
                        problem=f"not a canary audit result: {exc}",
                    )
                )
    audits = sorted(found.values(), key=lambda audit: (audit.site_id, audit.created))
    return tuple(audits), tuple(findings)
