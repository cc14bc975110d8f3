"""The error tree is the one table of codes: each code's exit code and decline code, pinned.

Exit codes are what scripts test for, and decline codes cross the network between sites and
aggregators of different versions, so changing either must be a conscious edit of ``TABLE``.
"""

from __future__ import annotations

import gc
import importlib
import pkgutil

import pytest
from flwr.app import Error

import medfed
import medfed.cli.app
from medfed import errors
from medfed.envelope import DECLINE_CODES, decline_error, read_decline
from medfed.errors import (
    INTERRUPTED_EXIT_CODE,
    PREFLIGHT_FAILED_EXIT_CODE,
    AppBundleError,
    ConfigError,
    LedgerError,
    MedfedError,
    error_classes,
)
from medfed.site.release import SHAREABLE_CODES, shareable

# code: (class, exit code, decline code)
TABLE: dict[str, tuple[str, int, int]] = {
    "error": ("MedfedError", 1, 4100),
    "config": ("ConfigError", 2, 4104),
    "run-settings": ("RunSettingsError", 15, 4112),
    "data": ("DataError", 3, 4103),
    "model": ("ModelError", 4, 4106),
    "device": ("DeviceError", 13, 4110),
    "privacy": ("PrivacyError", 5, 4109),
    "budget-exceeded": ("BudgetExceededError", 16, 4101),
    "ledger": ("LedgerError", 17, 4105),
    "privacy-unit": ("PrivacyUnitError", 18, 4108),
    "policy": ("PolicyError", 9, 4102),
    "aggregation": ("AggregationError", 7, 4113),
    "secure-aggregation": ("SecureAggregationError", 22, 4120),
    "training": ("TrainingError", 6, 4107),
    "transport": ("TransportError", 8, 4114),
    "storage": ("StorageError", 12, 4115),
    "envelope": ("EnvelopeError", 14, 4111),
    "audit": ("AuditError", 10, 4116),
    "privacy-audit-violated": ("PrivacyAuditViolation", 21, 4119),
    "app-bundle": ("AppBundleError", 19, 4117),
    "app-refused": ("AppRefusedError", 20, 4118),
}

# Decline codes sites of earlier versions send: an aggregator must keep reading them as these.
RELEASED_DECLINE_CODES = {
    "error": 4100,
    "budget-exceeded": 4101,
    "policy": 4102,
    "data": 4103,
    "config": 4104,
    "ledger": 4105,
    "model": 4106,
    "training": 4107,
    "privacy-unit": 4108,
    "privacy": 4109,
    "device": 4110,
    "envelope": 4111,
    "run-settings": 4112,
}


def _import_every_module() -> list[str]:
    names = [
        info.name for info in pkgutil.walk_packages(medfed.__path__, "medfed.", onerror=_raise)
    ]
    for name in names:
        importlib.import_module(name)
    return names


def _raise(name: str) -> None:
    raise ImportError(f"cannot walk {name}")


CLASSES = error_classes()


def test_the_table_is_pinned() -> None:
    found = {cls.code: (cls.__name__, cls.exit_code, cls.decline_code) for cls in CLASSES}
    assert found == TABLE
    for cls in CLASSES:
        assert getattr(errors, cls.__name__) is cls


def test_codes_exit_codes_and_decline_codes_are_each_unique() -> None:
    for name in ("code", "exit_code", "decline_code"):
        values = [getattr(cls, name) for cls in CLASSES]
        assert len(set(values)) == len(values), name


def test_exit_codes_leave_room_for_the_others() -> None:
    exit_codes = {cls.exit_code for cls in CLASSES}
    assert all(1 <= code <= 125 for code in exit_codes)  # 126 and up mean things to a shell
    assert PREFLIGHT_FAILED_EXIT_CODE not in exit_codes
    assert INTERRUPTED_EXIT_CODE not in exit_codes
    assert all(4100 <= cls.decline_code <= 4199 for cls in CLASSES)


def test_released_decline_codes_keep_their_numbers() -> None:
    assert {code: DECLINE_CODES[code] for code in RELEASED_DECLINE_CODES} == (
        RELEASED_DECLINE_CODES
    )
    assert dict(DECLINE_CODES) == {code: row[2] for code, row in TABLE.items()}


def test_every_medfed_error_anywhere_in_the_package_is_defined_in_errors() -> None:
    names = _import_every_module()
    assert "medfed.app_bundle" in names and "medfed.site.app_guard" in names
    outside = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in error_classes()
        if cls.__module__ != "medfed.errors"
    ]
    assert outside == []
    assert set(error_classes()) == set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.code)
def test_every_class_says_why_and_what_to_do(cls: type[MedfedError]) -> None:
    assert (vars(cls).get("__doc__") or "").strip()
    hint = vars(cls).get("default_hint")
    assert isinstance(hint, str) and hint.strip() and "\n" not in hint
    assert cls("x").one_line() == f"error[{cls.code}]: x (hint: {hint})"
    assert cls("x", hint="do this").one_line() == f"error[{cls.code}]: x (hint: do this)"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.code)
def test_the_cli_prints_one_line_and_exits_with_the_class_code(
    cls: type[MedfedError], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_app() -> None:
        raise cls("site-a: something is wrong")

    monkeypatch.setattr(medfed.cli.app, "app", failing_app)
    with pytest.raises(SystemExit) as exited:
        medfed.cli.app.main()
    assert exited.value.code == cls.exit_code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error[{cls.code}]: site-a: something is wrong (hint: " + (
        f"{cls.default_hint})\n"
    )


def test_an_interrupt_exits_with_its_own_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(medfed.cli.app, "app", interrupted)
    with pytest.raises(SystemExit) as exited:
        medfed.cli.app.main()
    assert exited.value.code == INTERRUPTED_EXIT_CODE
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.code)
def test_every_refusal_crosses_with_its_code(cls: type[MedfedError]) -> None:
    error = decline_error(cls("no"))
    assert error.code == cls.decline_code
    decline = read_decline(error)
    assert decline.code == cls.code
    assert decline.budget_spent == (cls.code == "budget-exceeded")


def test_a_decline_code_from_a_newer_site_is_read_from_its_reason() -> None:
    decline = read_decline(Error(code=4199, reason="error[quota]: too many runs (hint: wait)"))
    assert decline.code == "quota"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.code)
def test_only_shareable_refusals_carry_their_message(cls: type[MedfedError]) -> None:
    shared = shareable(cls("patient 0042 at /data/site-a", hint="see /data/site-a"))
    assert shared.code == cls.code
    if cls.code in SHAREABLE_CODES:
        assert shared.message == "patient 0042 at /data/site-a"
    else:
        assert "0042" not in shared.one_line() and "/data" not in shared.one_line()


def test_shareable_codes_are_codes_of_the_tree() -> None:
    assert set(TABLE) >= SHAREABLE_CODES


def test_app_bundle_errors_print_their_code_where_flower_reads_them() -> None:
    for cls in (AppBundleError, errors.AppRefusedError):
        error = cls("no")
        assert str(error) == error.one_line()
        assert issubclass(cls, AppBundleError)


def test_a_new_class_must_declare_its_own_distinct_values() -> None:
    with pytest.raises(TypeError, match="must declare its own exit_code, decline_code"):

        class Forgetful(MedfedError):
            """Declares its code only."""

            code = "forgetful"

    with pytest.raises(TypeError, match="'config' is already ConfigError's"):

        class Copycat(ConfigError):
            """Takes another class's code."""

            code = "config"
            exit_code = 99
            decline_code = 4199
            default_hint = "none"

    with pytest.raises(TypeError, match="default_hint"):

        class Hintless(MedfedError):
            """Says nothing about what to do."""

            code = "hintless"
            exit_code = 98
            decline_code = 4198
            default_hint = " "

    gc.collect()  # the refused classes linger in __subclasses__ until collected
    assert error_classes() == CLASSES


def test_signing_a_signed_object_is_a_ledger_error() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medfed.privacy.events import sign

    key = Ed25519PrivateKey.generate()
    signed = sign({"kind": "head"}, key)
    with pytest.raises(LedgerError, match="already has a signature") as caught:
        sign(signed, key)
    assert caught.value.hint


def test_tracking_control_flow_is_no_user_error() -> None:
    from medfed.tracking.buffer import PermanentError, is_transient

    assert not issubclass(PermanentError, MedfedError)
    assert not is_transient(PermanentError("never"))
