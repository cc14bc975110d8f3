"""Ledger entries: the two privacy events a site records, and their signed JSON form.

A ``reserve`` entry is written before training and holds everything needed to recompute the
privacy cost of a round; a ``commit`` entry is written after training and gives the steps
actually taken. Each entry is one line of canonical JSON, chained to the line before it by
``prev_hash`` and signed with the site's Ed25519 key over its canonical JSON without
``signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import PrivacyError
from medfed.privacy.accounting import (
    ACCOUNTANTS,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
)

LEDGER_VERSION: Final = 1
GENESIS_HASH: Final = "0" * 64

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


class EntryFormatError(ValueError):
    """An entry's JSON object does not have the fields and values of a ledger entry."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReserveEntry:
    """Privacy planned for one round, recorded before any training step."""

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    dataset_size: int
    accountant: str
    library_versions: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitEntry:
    """The steps a reserved round actually took, recorded after training."""

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    reservation_seq: int
    steps: int


LedgerEntry = ReserveEntry | CommitEntry


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The one byte string an object signs and hashes as: sorted keys, no spaces, ASCII."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def line_hash(line: bytes) -> str:
    """SHA-256 hex of one ledger line's exact bytes (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def sign(obj: Mapping[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """``obj`` with a ``signature`` over its canonical JSON (``obj`` must not have one yet)."""
    if "signature" in obj:
        raise ValueError("object is already signed")
    signature = private_key.sign(canonical_json(obj))
    return {**obj, "signature": base64.b64encode(signature).decode("ascii")}


def signature_valid(obj: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Whether ``obj['signature']`` signs the rest of ``obj`` under ``public_key``."""
    encoded = obj.get("signature")
    if not isinstance(encoded, str):
        return False
    try:
        signature = base64.b64decode(encoded.encode("ascii"), validate=True)
        unsigned = {key: value for key, value in obj.items() if key != "signature"}
        public_key.verify(signature, canonical_json(unsigned))
    except (InvalidSignature, binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return True


def entry_to_json(entry: LedgerEntry) -> dict[str, Any]:
    """The JSON object of an entry (the inverse of :func:`parse_entry`)."""
    kind = "reserve" if isinstance(entry, ReserveEntry) else "commit"
    obj: dict[str, Any] = {"v": LEDGER_VERSION, "kind": kind}
    for name in _FIELDS[kind]:
        if name not in obj:
            value = getattr(entry, name)
            obj[name] = dict(value) if isinstance(value, Mapping) else value
    return obj


def parse_entry(obj: object) -> LedgerEntry:
    """Check every field of a decoded ledger line and build its entry."""
    if not isinstance(obj, dict):
        raise EntryFormatError("not a JSON object")
    kind = obj.get("kind")
    if kind not in _FIELDS:
        raise EntryFormatError(f"unknown entry kind {kind!r} (expected 'reserve' or 'commit')")
    fields = _FIELDS[kind]
    missing = sorted(set(fields) - set(obj))
    unknown = sorted(set(obj) - set(fields))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing fields {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown fields {', '.join(unknown)}")
        raise EntryFormatError("; ".join(parts))
    for name, check in fields.items():
        problem = check(obj[name])
        if problem:
            raise EntryFormatError(f"field {name!r}: {problem}")
    values = {name: obj[name] for name in fields if name not in ("v", "kind")}
    if kind == "reserve":
        values["library_versions"] = dict(values["library_versions"])
        return ReserveEntry(**values)
    return CommitEntry(**values)


def _integer(minimum: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
        return None if value >= minimum else f"must be >= {minimum}, got {value}"

    return check


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > 256:
        return f"expected a non-empty string of at most 256 characters, got {value!r}"
    return None


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, str) and regex.match(value):
            return None
        return f"expected {what}, got {value!r}"

    return check


def _version(value: object) -> str | None:
    if value == LEDGER_VERSION and not isinstance(value, bool):
        return None
    return f"ledger format {value!r} is not supported (this medfed writes {LEDGER_VERSION})"


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


def _accountant(value: object) -> str | None:
    return None if value in ACCOUNTANTS else f"unknown accountant {value!r}"


def _versions(value: object) -> str | None:
    if isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        return None
    return "expected a mapping of package names to version strings"


_COMMON: Final[dict[str, Callable[[object], str | None]]] = {
    "v": _version,
    "kind": _kind,
    "seq": _integer(0),
    "prev_hash": _pattern(_HEX64, "64 lowercase hex digits"),
    "timestamp": _timestamp,
    "site_id": _text,
    "key_id": _pattern(_HEX16, "16 lowercase hex digits"),
    "signature": _base64,
}

_FIELDS: Final[dict[str, dict[str, Callable[[object], str | None]]]] = {
    "reserve": {
        **_COMMON,
        "run_id": _text,
        "round": _integer(0),
        "steps": _integer(0),
        "sample_rate": _privacy(check_sample_rate),
        "noise_multiplier": _privacy(check_noise_multiplier),
        "max_grad_norm": _positive_number,
        "delta": _privacy(check_delta),
        "dataset_size": _integer(1),
        "accountant": _accountant,
        "library_versions": _versions,
    },
    "commit": {**_COMMON, "reservation_seq": _integer(0), "steps": _integer(0)},
}
