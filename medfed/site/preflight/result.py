"""What a preflight check returns: one :class:`CheckResult` per check, and the whole report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Documented in `medfed site check --help`; defined next to the error tree's exit codes, so that
# none of them can take it.
from medfed.errors import PREFLIGHT_FAILED_EXIT_CODE as PREFLIGHT_FAILED_EXIT_CODE

Status = Literal["PASS", "WARN", "FAIL"]

_ORDER: Mapping[Status, int] = {"PASS": 0, "WARN": 1, "FAIL": 2}


@dataclass(frozen=True)
class CheckResult:
    """One line of the preflight report."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class PreflightReport:
    """Every check's result, in the order they ran."""

    config_path: Path
    site_id: str | None
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """True when nothing failed (warnings allowed)."""
        return all(result.status != "FAIL" for result in self.results)

    @property
    def status(self) -> Status:
        """The worst status of all checks."""
        return max((r.status for r in self.results), key=_ORDER.__getitem__, default="PASS")

    def result(self, name: str) -> CheckResult:
        """The result of the check called ``name``."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": str(self.config_path),
            "site_id": self.site_id,
            "status": self.status,
            "ok": self.ok,
            "checks": [result.to_dict() for result in self.results],
        }


def _pass(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "PASS", detail)


def _warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "WARN", detail, fix)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "FAIL", detail, fix)
