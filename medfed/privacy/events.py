"""Ledger entries: every privacy event a site records, and their signed JSON form.

Four kinds of entry, each one line of canonical JSON, chained to the line before it by
``prev_hash`` and signed with the site's Ed25519 key over its canonical JSON without
``signature``:

``terms``    the accountant, delta and epsilon cap the site's budget is kept under: written when
             the ledger is created and at every change, so that nobody can recompute a site's
             spend at another delta or hold it to another cap than the one it signed.
``reserve``  the DP-SGD steps planned for one round, written before the first noisy step.
``commit``   the steps a reserved round actually took, written after the last one.
``release``  one number (or a few) that left the site besides the model weights: a Gaussian
             mechanism of its own (patient counts, validation Dice), a coordinate of the DP-SGD
             steps of a reservation (the training loss), or a value the site's policy declares
             public, with the policy's reason.

Format 1 (reserve and commit only, with the delta, accountant and exact dataset size in every
reservation) is still read, so that a site's history is never lost; medfed writes format 2.
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
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import PrivacyError
from medfed.privacy.accounting import (
    ACCOUNTANTS,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
)

LEDGER_VERSION: Final = 2
READABLE_VERSIONS: Final = (1, 2)
GENESIS_HASH: Final = "0" * 64

Mechanism = Literal["gaussian", "dp-sgd", "public"]
MECHANISMS: Final[tuple[str, ...]] = ("gaussian", "dp-sgd", "public")
# What one release entry may hold, by quantity: the names of its values.
QUANTITIES: Final[Mapping[str, tuple[str, ...]]] = {
    "patients": ("train", "validation"),
    "train_loss": ("loss",),
    "validation_dice": ("dice",),
}
PRIVACY_UNIT: Final = "patient"

# Besides the releases, what a reply or a refusal shows, and why that is not about patients.
DECLARED_PUBLIC: Final[Mapping[str, str]] = {
    "site id": "the site's registered name, which the aggregator provisioned",
    "ledger entries": "the privacy accounting itself: settings, steps and released values, all "
    "computed from the run's settings, the site's policy and earlier releases",
    "model weights": "the output of DP-SGD (clipping and Gaussian noise), covered by the "
    "round's reservation; FedProx's pull towards the global model uses no patient data",
    "initial model": "a network seeded from the run's seed, built without any data",
    "decline code": "whether the site answered, and why in the words of its policy or budget; "
    "other causes as one fixed sentence per code",
}

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


class EntryFormatError(ValueError):
    """An entry's JSON object does not have the fields and values of a ledger entry."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TermsEntry:
    """The terms the site's budget is kept under from this entry on."""

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    accountant: str
    delta: float
    epsilon_cap: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ReserveEntry:
    """Privacy planned for one round, recorded before any training step.

    ``planned_rounds`` is the run's number of rounds as the site accepted it (None for the
    site's own training outside a federation). Format-1 entries have none, and carry
    ``legacy_delta``, ``legacy_accountant`` and the exact ``legacy_dataset_size`` instead
    (format 2 keeps the first two in terms entries and never records an exact patient count).
    """

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    run_id: str
    round: int
    planned_rounds: int | None
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    library_versions: Mapping[str, str]
    version: int = LEDGER_VERSION
    legacy_delta: float | None = None
    legacy_accountant: str | None = None
    legacy_dataset_size: int | None = None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseEntry:
    """Numbers that left the site, and the mechanism that covers them.

    ``gaussian``: ``values`` are the function's values plus Gaussian noise of standard deviation
    ``noise_multiplier x sensitivity`` (add/remove one patient changes the function by at most
    ``sensitivity`` in L2), then post-processed; ``noise_std`` is the standard deviation of each
    released value. ``dp-sgd``: the value was one more coordinate of the clipped per-patient
    vectors of reservation ``reservation_seq`` and got that reservation's noise, so it costs
    nothing more. ``public``: the site's policy declares it public, for ``reason``.
    ``model_sha256`` names the model the values were computed with, when there is one.
    """

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    run_id: str
    round: int
    quantity: str
    values: Mapping[str, float]
    mechanism: str
    unit: str
    noise_multiplier: float | None
    sensitivity: float | None
    noise_std: float | None
    reservation_seq: int | None
    model_sha256: str | None
    reason: str | None


LedgerEntry = TermsEntry | ReserveEntry | CommitEntry | ReleaseEntry


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
    if kind == "terms":
        return TermsEntry(**values)
    if kind == "commit":
        return CommitEntry(**values)
    if kind == "release":
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
    return ReserveEntry(**values)


def _check_release(values: Mapping[str, Any]) -> None:
    """The fields a release's mechanism needs, and only those."""
    quantity, mechanism = values["quantity"], values["mechanism"]
    names = QUANTITIES[quantity]
    if set(values["values"]) != set(names):
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
