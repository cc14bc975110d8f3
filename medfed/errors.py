"""The medfed error tree, and the one table of its codes.

Every error a user can cause carries a short machine-readable ``code``, a message that says what
went wrong and where, and a ``hint`` that says what to do about it. The CLI turns these into one
line on stderr and a non-zero exit code; nothing else should be caught and silenced.

Each class declares, in its own body, four things that together make the table:

``code``          the name in ``error[code]``, which logs, events and the aggregator show
``exit_code``     what the CLI exits with, so that scripts can tell the causes apart
``decline_code``  the Flower error code a site's refusal travels with (41xx). These cross the
                  network between sites and aggregators of different medfed versions: a number,
                  once given, is never changed or reused.
``default_hint``  the hint :meth:`MedfedError.one_line` shows when the raise gave none, so that
                  every error a user sees says what to do. It may reach the aggregator with a
                  site's refusal (:mod:`medfed.site.release`), so it names no file, site or
                  patient.

A class that leaves any of them to its parent, or repeats another class's value, is refused
when it is defined (:class:`TypeError`): a new error cannot silently exit, or decline, as
another one. Exit codes outside the tree are the constants below; ``2`` is also what the
command line's own usage errors (unknown option, missing argument) exit with, and
:class:`ConfigError` shares it on purpose: both mean "what you asked for is not valid as
written".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import ClassVar, Final

PREFLIGHT_FAILED_EXIT_CODE: Final = 11
"""``medfed site check`` found a FAIL; its report, not an error line, says what to fix."""

INTERRUPTED_EXIT_CODE: Final = 130
"""Ctrl-C, the shell's convention (128 + SIGINT)."""

_DECLARED: Final = ("code", "exit_code", "decline_code", "default_hint")


class MedfedError(Exception):
    """Base class of every error medfed raises on purpose."""

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1
    decline_code: ClassVar[int] = 4100
    default_hint: ClassVar[str] = "the log has the details"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        missing = [name for name in _DECLARED if name not in vars(cls)]
        if missing:
            raise TypeError(f"{cls.__qualname__} must declare its own {', '.join(missing)}")
        if not cls.default_hint.strip():
            raise TypeError(f"{cls.__qualname__} needs a default_hint that says what to do")
        for other in error_classes():
            if other is cls:
                continue
            for name in ("code", "exit_code", "decline_code"):
                if getattr(other, name) == getattr(cls, name):
                    raise TypeError(
                        f"{cls.__qualname__}.{name} {getattr(cls, name)!r} is already "
                        f"{other.__qualname__}'s"
                    )

    def one_line(self) -> str:
        """The single line the CLI prints: the raise's own hint, or the class's default."""
        return f"error[{self.code}]: {self.message} (hint: {self.hint or self.default_hint})"


def error_classes() -> tuple[type[MedfedError], ...]:
    """:class:`MedfedError` and every subclass of it, parents before children."""

    def walk(cls: type[MedfedError]) -> Iterator[type[MedfedError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return tuple(walk(MedfedError))


def decline_codes() -> Mapping[str, int]:
    """Every error code and the Flower error code a site's refusal with it is sent as."""
    return MappingProxyType({cls.code: cls.decline_code for cls in error_classes()})


class ConfigError(MedfedError):
    """A configuration file or setting is missing, unreadable or invalid."""

    code = "config"
    exit_code = 2
    decline_code = 4104
    default_hint = "fix the file or setting named above, then run the command again"


class RunSettingsError(ConfigError):
    """A run's settings cannot be applied at a site: they do not fit its data or its network."""

    code = "run-settings"
    exit_code = 15
    decline_code = 4112
    default_hint = "change the run's settings so that they fit every site's data and network"


class DataError(MedfedError):
    """A dataset, manifest or image file cannot be used."""

    code = "data"
    exit_code = 3
    decline_code = 4103
    default_hint = "run `medfed data check` on the site's dataset"


class ModelError(MedfedError):
    """A network cannot be built, checked or restored."""

    code = "model"
    exit_code = 4
    decline_code = 4106
    default_hint = "check the run's model settings and the checkpoint it starts from"


class DeviceError(MedfedError):
    """The requested compute device is not available."""

    code = "device"
    exit_code = 13
    decline_code = 4110
    default_hint = "set training.device to auto or cpu, or make the GPU usable by torch"


class PrivacyError(MedfedError):
    """Base of every privacy-related refusal."""

    code = "privacy"
    exit_code = 5
    decline_code = 4109
    default_hint = "check the privacy settings: noise multiplier, delta and sample rate"


class BudgetExceededError(PrivacyError):
    """The planned training would take the site past its privacy cap; nothing was spent."""

    code = "budget-exceeded"
    exit_code = 16
    decline_code = 4101
    default_hint = "plan fewer rounds or steps, or more noise, to stay within the site's cap"


class LedgerError(PrivacyError):
    """The privacy ledger failed verification or could not be written."""

    code = "ledger"
    exit_code = 17
    decline_code = 4105
    default_hint = "run `medfed privacy ledger`; restore the ledger from its backup, never edit it"


class PrivacyUnitError(PrivacyError):
    """A batch would let one patient contribute more than one clipped gradient per step."""

    code = "privacy-unit"
    exit_code = 18
    decline_code = 4108
    default_hint = "keep one row per patient in the manifest and one crop per patient per step"


class PolicyError(MedfedError):
    """A federation run asks for something the site's policy does not allow; nothing ran."""

    code = "policy"
    exit_code = 9
    decline_code = 4102
    default_hint = "change the run to fit the site's policy, or ask the site to change it"


class AggregationError(MedfedError):
    """Site updates cannot be merged (none left, or they do not fit the global model)."""

    code = "aggregation"
    exit_code = 7
    decline_code = 4113
    default_hint = "check that enough sites answered and that all of them train the same model"


class SecureAggregationError(AggregationError):
    """A securely aggregated round cannot be summed, or a site refuses an unmasking request."""

    code = "secure-aggregation"
    exit_code = 22
    decline_code = 4120
    default_hint = (
        "run the round again with fresh keys (a new key epoch) once enough sites are online"
    )


class TrainingError(MedfedError):
    """Training could not run or diverged."""

    code = "training"
    exit_code = 6
    decline_code = 4107
    default_hint = "the site's log has the failing step; a lower learning rate helps divergence"


class TransportError(MedfedError):
    """A Flower process or command failed: it did not start, exited, or was refused."""

    code = "transport"
    exit_code = 8
    decline_code = 4114
    default_hint = "check that the Flower processes run and reach each other (address, TLS)"


class StorageError(MedfedError):
    """A file could not be read, written or locked (disk full, permissions, a damaged file)."""

    code = "storage"
    exit_code = 12
    decline_code = 4115
    default_hint = "check the free disk space and the permissions of the path named above"


class EnvelopeError(MedfedError):
    """A message lacks a field medfed needs, or a field has the wrong type."""

    code = "envelope"
    exit_code = 14
    decline_code = 4111
    default_hint = "run the same medfed version at the aggregator and at every site"


class AuditError(MedfedError):
    """An audit found a ledger, an epsilon or a budget that does not hold (see its findings)."""

    code = "audit"
    exit_code = 10
    decline_code = 4116
    default_hint = "each FINDING line above names the site, the file and the entry"


class PrivacyAuditViolation(AuditError):
    """An empirical privacy audit proved more privacy loss than the audited run's ledger claims."""

    code = "privacy-audit-violated"
    exit_code = 21
    decline_code = 4119
    default_hint = (
        "the DP-SGD path leaks more than its ledger records: check its noise, clipping and "
        "sample rate before the site trains again"
    )


class AppBundleError(MedfedError):
    """A Flower app bundle (FAB) is unreadable or malformed; nothing of it was run."""

    code = "app-bundle"
    exit_code = 19
    decline_code = 4117
    default_hint = "build the app again (`flwr build`), or reinstall medfed for its own app"

    def __str__(self) -> str:
        # Flower puts str(exception) into the error reply: the aggregator reads the code there.
        return self.one_line()


class AppRefusedError(AppBundleError):
    """A site's allow-list does not hold the app bundle a run shipped; nothing of it was run."""

    code = "app-refused"
    exit_code = 20
    decline_code = 4118
    default_hint = "run the site's medfed version, or list the app in policy.allowed_app_hashes"
