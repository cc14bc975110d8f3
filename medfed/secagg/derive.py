"""Key derivation and randomness shared by every stage of the protocol.

Every derived key names its purpose and the context it belongs to (run, key epoch, sites,
round) in HKDF's ``info``, so that a key made for one purpose or one round is never the key of
another: a pairwise seed cannot be mistaken for a share-encryption key, and the mask of round 3
tells nothing about the mask of round 4.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RandomBytes = Callable[[int], bytes]
"""A source of uniformly random bytes: ``os.urandom`` unless a test passes a seeded one."""

SYSTEM_RANDOM: Final[RandomBytes] = os.urandom
KEY_BYTES: Final = 32
_PROTOCOL: Final = "medfed-secagg-v1"

ContextValue = str | int | bytes


def context_bytes(purpose: str, **context: ContextValue) -> bytes:
    """One unambiguous byte string for a purpose and its context (canonical JSON, bytes as hex)."""
    fields: dict[str, str | int] = {
        name: value.hex() if isinstance(value, bytes) else value for name, value in context.items()
    }
    document = {"protocol": _PROTOCOL, "purpose": purpose, "context": fields}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def derive_key(secret: bytes, *, purpose: str, **context: ContextValue) -> bytes:
    """A 32-byte key from ``secret`` (HKDF-SHA256), bound to ``purpose`` and ``context``."""
    hkdf = HKDF(
        algorithm=SHA256(), length=KEY_BYTES, salt=None, info=context_bytes(purpose, **context)
    )
    return hkdf.derive(secret)


def random_key(random_bytes: RandomBytes) -> bytes:
    """32 fresh random bytes, checked to be 32: a short read would weaken every key made from it."""
    value = random_bytes(KEY_BYTES)
    if len(value) != KEY_BYTES:
        raise ValueError(f"the random source gave {len(value)} bytes, not {KEY_BYTES}")
    return value
