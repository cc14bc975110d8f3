"""Sealed releases: values released through a DP mechanism that stay at the site.

Under secure aggregation a site's noisy patient counts weight its update inside the masked
sum, so the aggregator must not read them in the ledger either. The release entry then keeps
everything the accounting needs (mechanism, noise, sensitivity) and, in place of the values, a
commitment: SHA-256 over a random 32-byte salt and the values' canonical JSON. The site keeps
the values and the salt in its own private state, so that an auditor at the site can open the
commitment (:func:`opens`), and nobody else learns more than the sums they crossed in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from medfed.privacy.events import canonical_json

SALT_BYTES = 32


@dataclass(frozen=True)
class Sealed:
    """Released values, their salt (both kept at the site) and the commitment the ledger holds."""

    values: Mapping[str, float]
    salt: str
    commitment: str


def commitment_of(*, values: Mapping[str, float], salt: str) -> str:
    """SHA-256 hex of the salt's bytes followed by the values' canonical JSON."""
    text = canonical_json({key: float(value) for key, value in values.items()})
    return hashlib.sha256(bytes.fromhex(salt) + text).hexdigest()


def seal(values: Mapping[str, float]) -> Sealed:
    """Commit to ``values`` under a fresh salt from the operating system."""
    salt = secrets.token_hex(SALT_BYTES)
    kept = {key: float(value) for key, value in values.items()}
    return Sealed(values=kept, salt=salt, commitment=commitment_of(values=kept, salt=salt))


def opens(*, commitment: str, values: Mapping[str, float], salt: str) -> bool:
    """Whether ``values`` and ``salt`` are what ``commitment`` was made from."""
    try:
        computed = commitment_of(values=values, salt=salt)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, commitment)
