"""The aggregator's countersigned receipt of a site's ledger: "I hold your first ``count``
entries, the last of them hashing to ``last_hash``", signed with the aggregator's receipt key.

The aggregator sends a fresh receipt with every request. The site checks it before it reserves
anything: a ledger that holds fewer entries than the aggregator accepted, or other ones, was
rolled back (an older copy restored), and the round is refused before a step is spent twice.
The site keeps the newest receipt beside its ledger (``<ledger>.receipt``) and checks it
whenever it verifies its ledger, so that local training after a restore of the ledger file is
refused too. A receipt records only what the aggregator already holds: it never moves a site's
count backwards, and a stored receipt is replaced only by one that covers at least as much.

What it does not protect against: a site that never took part in a round has no receipt, and
someone who restores the whole ledger directory (receipt included) and then trains locally only
is caught at the next federated round, not before; the head witness
(:mod:`medfed.privacy.witness`) covers that in between.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError
from medfed.privacy.events import (
    GENESIS_HASH,
    LEDGER_VERSION,
    canonical_json,
    sign,
    signature_valid,
)
from medfed.privacy.keys import key_id
from medfed.privacy.ledger import LedgerReport
from medfed.storage import locked, read_bytes, replace_file

_FIELDS: Final = frozenset({"v", "kind", "site_id", "key_id", "count", "last_hash", "signature"})
_ROLLBACK_HINT: Final = (
    "restore the newest copy of the ledger and its .head file; the entries the aggregator "
    "accepted since the old copy must stay counted"
)


def receipt_path(ledger_path: Path) -> Path:
    """Where the site keeps the newest receipt: ``<ledger>.receipt``."""
    return ledger_path.with_name(ledger_path.name + ".receipt")


@dataclass(frozen=True, slots=True)
class LedgerReceipt:
    """A verified receipt: the aggregator holds ``count`` entries of ``site_id``'s ledger."""

    site_id: str
    count: int
    last_hash: str
    key_id: str
    text: str  # the signed canonical JSON, as it travels and is stored


def make_receipt(
    *, site_id: str, count: int, last_hash: str, private_key: Ed25519PrivateKey
) -> str:
    """The signed receipt text for ``count`` entries ending in ``last_hash``."""
    body = {
        "v": LEDGER_VERSION,
        "kind": "receipt",
        "site_id": site_id,
        "key_id": key_id(private_key.public_key()),
        "count": count,
        "last_hash": last_hash,
    }
    return canonical_json(sign(body, private_key)).decode("ascii")


def read_receipt(text: str, *, public_key: Ed25519PublicKey, site_id: str) -> LedgerReceipt:
    """Parse and verify a receipt for ``site_id``; LedgerError naming what is wrong."""
    try:
        obj: Any = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or set(obj) != _FIELDS or obj.get("kind") != "receipt":
        raise _bad("is not a ledger receipt (wrong fields or format)")
    count, last = obj["count"], obj["last_hash"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise _bad(f"count must be an integer >= 0, got {count!r}")
    if not isinstance(last, str) or len(last) != 64:
        raise _bad("last_hash must be 64 hex digits")
    if obj["key_id"] != key_id(public_key) or not signature_valid(obj, public_key):
        raise _bad(
            "bad signature or foreign key: it was not signed by this federation's aggregator"
        )
    if obj["site_id"] != site_id:
        raise _bad(f"is for site {obj['site_id']!r}, not {site_id!r}")
    return LedgerReceipt(
        site_id=site_id, count=count, last_hash=last, key_id=obj["key_id"], text=text
    )


def hash_after(report: LedgerReport, count: int) -> str | None:
    """The hash of the ledger's entry ``count - 1`` (genesis for 0); None past its end."""
    entries = report.entries
    if count == 0:
        return GENESIS_HASH
    if count < len(entries):
        return entries[count].prev_hash
    if count == len(entries):
        return report.last_hash
    return None


def check_receipt(report: LedgerReport, receipt: LedgerReceipt, *, where: str) -> None:
    """Refuse a ledger that does not extend what ``receipt`` says the aggregator holds."""
    held = len(report.entries)
    if receipt.count > held:
        raise LedgerError(
            f"{where}: the aggregator accepted {receipt.count} entries of site "
            f"{receipt.site_id}'s ledger but {report.path} holds {held}: the ledger was rolled "
            "back (an older copy restored)",
            hint=_ROLLBACK_HINT,
        )
    if hash_after(report, receipt.count) != receipt.last_hash:
        raise LedgerError(
            f"{where}: entry {receipt.count - 1} of {report.path} differs from the one the "
            "aggregator accepted: the ledger was rewritten or replaced",
            hint=_ROLLBACK_HINT,
        )


@dataclass(frozen=True)
class ReceiptStore:
    """The newest receipt a site accepted, kept beside its ledger."""

    ledger_path: Path
    site_id: str
    public_key: Ed25519PublicKey

    @property
    def path(self) -> Path:
        return receipt_path(self.ledger_path)

    def load(self) -> LedgerReceipt | None:
        """The stored receipt (verified), or None when the site holds none yet."""
        if not self.path.exists():
            return None
        try:
            text = read_bytes(self.path).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise LedgerError(f"receipt {self.path} cannot be read", hint=_ROLLBACK_HINT) from None
        try:
            return read_receipt(text, public_key=self.public_key, site_id=self.site_id)
        except LedgerError as exc:
            raise LedgerError(f"{self.path}: {exc.message}", hint=exc.hint) from None

    def keep(self, receipt: LedgerReceipt) -> LedgerReceipt:
        """Store ``receipt`` unless the stored one covers more; the receipt kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path, exclusive=True):
            current = self.load()
            if current is not None and current.count > receipt.count:
                return current
            if current != receipt:
                replace_file(self.path, receipt.text.encode("ascii") + b"\n", mode=0o600)
        return receipt


def _bad(problem: str) -> LedgerError:
    return LedgerError(
        f"ledger receipt {problem}",
        hint="check that the site's transport.receipt_public_key is the aggregator_receipt.pub "
        "of its kit",
    )
