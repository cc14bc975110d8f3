"""The medfed error tree.

Every error a user can cause carries a short machine-readable ``code``, a message that says what
went wrong and where, and a ``hint`` that says what to do about it. The CLI turns these into one
line on stderr and a non-zero exit code; nothing else should be caught and silenced.
"""

from __future__ import annotations

from typing import ClassVar


class MedfedError(Exception):
    """Base class of every error medfed raises on purpose."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The single line the CLI prints."""
        text = f"error[{self.code}]: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class ConfigError(MedfedError):
    """A configuration file or setting is missing, unreadable or invalid."""

    code = "config"
    exit_code = 2


class RunSettingsError(ConfigError):
    """A run's settings cannot be applied at a site: they do not fit its data or its network."""

    code = "run-settings"


class DataError(MedfedError):
    """A dataset, manifest or image file cannot be used."""

    code = "data"
    exit_code = 3


class ModelError(MedfedError):
    """A network cannot be built, checked or restored."""

    code = "model"
    exit_code = 4


class DeviceError(MedfedError):
    """The requested compute device is not available."""

    code = "device"
    exit_code = 4


class PrivacyError(MedfedError):
    """Base of every privacy-related refusal."""

    code = "privacy"
    exit_code = 5


class BudgetExceededError(PrivacyError):
    """The planned training would take the site past its privacy cap; nothing was spent."""

    code = "budget-exceeded"


class LedgerError(PrivacyError):
    """The privacy ledger failed verification or could not be written."""

    code = "ledger"


class PrivacyUnitError(PrivacyError):
    """A batch would let one patient contribute more than one clipped gradient per step."""

    code = "privacy-unit"


class PolicyError(MedfedError):
    """A federation run asks for something the site's policy does not allow; nothing ran."""

    code = "policy"
    exit_code = 9


class AggregationError(MedfedError):
    """Site updates cannot be merged (none left, or they do not fit the global model)."""

    code = "aggregation"
    exit_code = 7


class TrainingError(MedfedError):
    """Training could not run or diverged."""

    code = "training"
    exit_code = 6


class TransportError(MedfedError):
    """A Flower process or command failed: it did not start, exited, or was refused."""

    code = "transport"
    exit_code = 8


class AuditError(MedfedError):
    """An audit found a ledger, an epsilon or a budget that does not hold (see its findings)."""

    code = "audit"
    exit_code = 10
