"""The signed head file kept next to a ledger: how many entries it holds and the hash of the
last, so that cutting entries off the end is detected.

A head exactly one entry behind a ledger whose extra last line verifies is accepted: that is
what a crash between appending a line and replacing the head leaves, and the extra entry can
only add to the privacy spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError
from medfed.privacy.events import (
    GENESIS_HASH,
    LEDGER_VERSION,
    READABLE_VERSIONS,
    canonical_json,
    line_hash,
    sign,
    signature_valid,
)
from medfed.privacy.keys import key_id
from medfed.storage import replace_file

RESTORE_HINT = (
    "restore the ledger and its .head file together from the site's backup and verify again; "
    "never edit a ledger by hand"
)
_HEAD_FIELDS = frozenset({"v", "kind", "site_id", "key_id", "count", "last_hash", "signature"})


def head_path(ledger_path: Path) -> Path:
    """The signed head file kept next to a ledger: ``<ledger>.head``."""
    return ledger_path.with_name(ledger_path.name + ".head")


def ledger_failure(path: Path, where: str, problem: str) -> LedgerError:
    return LedgerError(f"{path}: {where}: {problem}", hint=RESTORE_HINT)


def check_head(
    path: Path,
    head: dict[str, Any] | None,
    lines: list[bytes],
    public_key: Ed25519PublicKey,
    expected_key: str,
    site_id: str | None,
) -> bool:
    """Check the head against the ledger; True when it is one (verified) entry behind."""
    where = f"head {head_path(path).name}"
    if head is None:
        if lines:
            raise ledger_failure(
                path, where, f"missing while the ledger holds {len(lines)} entries"
            )
        return False
    readable = head.get("v") in READABLE_VERSIONS and head.get("kind") == "head"
    if set(head) != _HEAD_FIELDS or not readable:
        raise ledger_failure(path, where, "not a ledger head (wrong fields or format)")
    count, last = head["count"], head["last_hash"]
    if isinstance(count, bool) or not isinstance(count, int) or not isinstance(last, str):
        raise ledger_failure(path, where, "count or last_hash has the wrong type")
    if head["key_id"] != expected_key or not signature_valid(head, public_key):
        raise ledger_failure(
            path, where, "bad signature or foreign key: the head was not written here"
        )
    if lines and head["site_id"] != site_id:
        raise ledger_failure(
            path, where, f"belongs to site {head['site_id']!r}, expected {site_id!r}"
        )
    total = len(lines)
    if count > total:
        raise ledger_failure(
            path,
            where,
            f"records {count} entries but the ledger holds {total}: entries were cut off the "
            f"end (first missing: line {total + 1}, seq {total})",
        )
    if count < total - 1:
        raise ledger_failure(
            path,
            where,
            f"records {count} entries but the ledger holds {total}: lines {count + 1} to "
            f"{total} were added without updating the head",
        )
    hashes = [GENESIS_HASH, *(line_hash(raw) for raw in lines)]
    if last != hashes[count]:
        raise ledger_failure(
            path,
            where,
            f"the last entry it records (line {count}) differs from the ledger's: the ledger "
            "was rewritten",
        )
    return count == total - 1


def signed_head(
    *, site_id: str, count: int, last_hash: str, private_key: Ed25519PrivateKey
) -> bytes:
    """The bytes of a head file for a ledger of ``count`` entries ending in ``last_hash``."""
    head = {
        "v": LEDGER_VERSION,
        "kind": "head",
        "site_id": site_id,
        "key_id": key_id(private_key.public_key()),
        "count": count,
        "last_hash": last_hash,
    }
    return canonical_json(sign(head, private_key)) + b"\n"


def write_head(
    ledger_path: Path, *, site_id: str, count: int, last_hash: str, private_key: Ed25519PrivateKey
) -> None:
    """Atomically replace the ledger's head file."""
    data = signed_head(site_id=site_id, count=count, last_hash=last_hash, private_key=private_key)
    replace_file(head_path(ledger_path), data)
