"""Reading one ledger line: every field of every entry kind and format checked, then the entry.

The schema of each format is here, one checker per field, so that a line that is not exactly
what medfed writes (a missing or unknown field, a value out of range, a release without the
fields its mechanism needs) is refused with the field it is about.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

from medfed.errors import PrivacyError
from medfed.privacy.accounting import (
    ACCOUNTANTS,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
)
from medfed.privacy.distributed_noise import DistributedPlan
from medfed.privacy.events import (
    MECHANISMS,
    PRIVACY_UNIT,
    QUANTITIES,
    READABLE_VERSIONS,
    CommitEntry,
    LedgerEntry,
    ReleaseEntry,
    ReserveEntry,
    TermsEntry,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


class EntryFormatError(ValueError):
    """An entry's JSON object does not have the fields and values of a ledger entry."""


def parse_entry(obj: object) -> LedgerEntry:
    """Check every field of a decoded ledger line and build its entry."""
    if not isinstance(obj, dict):
        raise EntryFormatError("not a JSON object")
    version = obj.get("v")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise EntryFormatError(
            f"ledger format {version!r} is not supported (this medfed reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    schemas = _SCHEMAS[version]
    kind = obj.get("kind")
    if kind not in schemas:
        raise EntryFormatError(
            f"unknown entry kind {kind!r} in format {version} (expected "
            f"{', '.join(repr(k) for k in schemas)})"
        )
    fields = schemas[kind]
    optional = _OPTIONAL[version].get(kind, {})
    missing = sorted(set(fields) - set(obj))
    unknown = sorted(set(obj) - set(fields) - set(optional))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing fields {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown fields {', '.join(unknown)}")
        raise EntryFormatError("; ".join(parts))
    for name, check in [*fields.items(), *optional.items()]:
        if name not in obj:
            continue
        problem = check(obj[name])
        if problem:
            raise EntryFormatError(f"field {name!r}: {problem}")
    values = {name: obj[name] for name in fields if name not in ("v", "kind")}
    if kind == "reserve":
        _check_adaptive_clipping(obj)
    if kind == "terms":
        return TermsEntry(**values)
    if kind == "commit":
        return CommitEntry(**values, **{name: obj[name] for name in optional if name in obj})
    if kind == "release":
        values["sealed"] = obj.get("sealed")
        _check_release(values)
        values["values"] = {key: float(value) for key, value in values["values"].items()}
        return ReleaseEntry(**values)
    values["library_versions"] = dict(values["library_versions"])
    if version == 1:
        return ReserveEntry(
            version=1,
            planned_rounds=None,
            legacy_delta=values.pop("delta"),
            legacy_accountant=values.pop("accountant"),
            legacy_dataset_size=values.pop("dataset_size"),
            **values,
        )
    extra = {name: obj[name] for name in optional if name in obj}
    if "distributed" in extra:
        extra["distributed"] = dict(extra["distributed"])
    return ReserveEntry(**values, **extra)


def _check_adaptive_clipping(obj: Mapping[str, Any]) -> None:
    """A reservation with adaptive clipping: a count noise that leaves the sum some noise.

    ``noise_multiplier`` stays what the accountant charges (every reader, old or new, gets
    the true cost from it); ``count_noise_multiplier`` says how the step split it between the
    clipped sum and the clip count (:func:`medfed.privacy.accounting.adaptive_clipping_noise`),
    which is possible only when it exceeds the noise multiplier.
    """
    count = obj.get("count_noise_multiplier")
    if count is not None and not count > obj["noise_multiplier"]:
        raise EntryFormatError(
            f"field 'count_noise_multiplier': {count!r} must exceed the noise multiplier "
            f"{obj['noise_multiplier']!r} (adaptive clipping splits that noise between the "
            "clipped sum and the clip count)"
        )


def _check_release(values: Mapping[str, Any]) -> None:
    """The fields a release's mechanism needs, and only those."""
    quantity, mechanism = values["quantity"], values["mechanism"]
    names = QUANTITIES[quantity]
    if values["sealed"] is not None:
        if mechanism != "gaussian" or values["values"]:
            raise EntryFormatError(
                "a sealed release is a Gaussian one whose values stay at the site: it holds no "
                "values"
            )
    elif set(values["values"]) != set(names):
        raise EntryFormatError(f"a {quantity} release holds the values {', '.join(names)}")
    needs = {
        "gaussian": {"noise_multiplier", "sensitivity", "noise_std"},
        "dp-sgd": {"noise_multiplier", "sensitivity", "noise_std", "reservation_seq"},
        "public": {"reason"},
    }[mechanism]
    optional = {"model_sha256"}
    for name in ("noise_multiplier", "sensitivity", "noise_std", "reservation_seq", "reason"):
        given = values[name] is not None
        if given and name not in needs | optional:
            raise EntryFormatError(f"a {mechanism} release has no {name}")
        if not given and name in needs:
            raise EntryFormatError(f"a {mechanism} release needs {name}")


def _integer(minimum: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        return None if value >= minimum else f"must be >= {minimum}, got {value}"

    return check


def _optional(check: Callable[[object], str | None]) -> Callable[[object], str | None]:
    def wrapped(value: object) -> str | None:
        return None if value is None else check(value)

    return wrapped


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 256:
        return f"expected a non-empty string of at most 256 characters, got {value!r}"
    return None


def _long_text(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        return "expected a non-empty string of at most 1000 characters"
    return None


def _one_of(choices: tuple[str, ...] | Mapping[str, Any]) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value in choices else f"expected one of {', '.join(choices)}, got {value!r}"

    return check


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, str) and regex.match(value):
            return None
        return f"expected {what}, got {value!r}"

    return check


def _kind(value: object) -> str | None:
    return None  # parse_entry has chosen the schema by this field already


def _timestamp(value: object) -> str | None:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return None
    return f"expected an ISO 8601 time with time zone, got {value!r}"


def _base64(value: object) -> str | None:
    if isinstance(value, str):
        try:
            base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            pass
        else:
            return None
    return "expected base64 text"


def _privacy(check: Callable[[float], None]) -> Callable[[object], str | None]:
    def wrapped(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        try:
            check(value)
        except PrivacyError as exc:
            return exc.message
        return None

    return wrapped


def _positive_number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {value!r}"
    return None if 0 < value < math.inf else f"must be a finite number > 0, got {value!r}"


def _non_negative_number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, got {value!r}"
    return None if 0 <= value < math.inf else f"must be a finite number >= 0, got {value!r}"


def _numbers(value: object) -> str | None:
    if isinstance(value, dict) and all(
        isinstance(key, str)
        and isinstance(item, int | float)
        and not isinstance(item, bool)
        and math.isfinite(item)
        for key, item in value.items()
    ):
        return None
    return "expected a mapping of names to finite numbers"


def _distributed(value: object) -> str | None:
    """A distributed plan: exactly its fields, each of the right type and range."""
    try:
        DistributedPlan.from_json(value)
    except PrivacyError as exc:
        return exc.message
    return None


def _versions(value: object) -> str | None:
    if isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        return None
    return "expected a mapping of package names to version strings"


def _version_field(version: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value == version else f"expected format {version}, got {value!r}"

    return check


def _common(version: int) -> dict[str, Callable[[object], str | None]]:
    return {
        "v": _version_field(version),
        "kind": _kind,
        "seq": _integer(0),
        "prev_hash": _pattern(_HEX64, "64 lowercase hex digits"),
        "timestamp": _timestamp,
        "site_id": _text,
        "key_id": _pattern(_HEX16, "16 lowercase hex digits"),
        "signature": _base64,
    }


_STEPS: Final[dict[str, Callable[[object], str | None]]] = {
    "run_id": _text,
    "round": _integer(0),
    "steps": _integer(0),
    "sample_rate": _privacy(check_sample_rate),
    "noise_multiplier": _privacy(check_noise_multiplier),
    "max_grad_norm": _positive_number,
    "library_versions": _versions,
}
_COMMIT: Final[dict[str, Callable[[object], str | None]]] = {
    "reservation_seq": _integer(0),
    "steps": _integer(0),
}

# Fields an entry may leave out, by format and kind: each one added after the format was
# first written, so that the entries written before it stay valid as they are.
_OPTIONAL: Final[dict[int, dict[str, dict[str, Callable[[object], str | None]]]]] = {
    1: {},
    2: {
        "reserve": {
            "count_noise_multiplier": _privacy(check_noise_multiplier),
            "distributed": _distributed,
        },
        "commit": {
            "model_sha256": _pattern(_HEX64, "64 lowercase hex digits"),
            "update_sha256": _pattern(_HEX64, "64 lowercase hex digits"),
        },
        "release": {"sealed": _pattern(_HEX64, "64 lowercase hex digits")},
    },
}

_SCHEMAS: Final[dict[int, dict[str, dict[str, Callable[[object], str | None]]]]] = {
    1: {
        "reserve": {
            **_common(1),
            **_STEPS,
            "delta": _privacy(check_delta),
            "dataset_size": _integer(1),
            "accountant": _one_of(ACCOUNTANTS),
        },
        "commit": {**_common(1), **_COMMIT},
    },
    2: {
        "terms": {
            **_common(2),
            "accountant": _one_of(ACCOUNTANTS),
            "delta": _privacy(check_delta),
            "epsilon_cap": _positive_number,
        },
        "reserve": {**_common(2), **_STEPS, "planned_rounds": _optional(_integer(1))},
        "commit": {**_common(2), **_COMMIT},
        "release": {
            **_common(2),
            "run_id": _text,
            "round": _integer(0),
            "quantity": _one_of(QUANTITIES),
            "values": _numbers,
            "mechanism": _one_of(MECHANISMS),
            "unit": _one_of((PRIVACY_UNIT,)),
            "noise_multiplier": _optional(_privacy(check_noise_multiplier)),
            "sensitivity": _optional(_positive_number),
            "noise_std": _optional(_non_negative_number),
            "reservation_seq": _optional(_integer(0)),
            "model_sha256": _optional(_pattern(_HEX64, "64 lowercase hex digits")),
            "reason": _optional(_long_text),
        },
    },
}
