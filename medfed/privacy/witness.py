"""A second copy of a site's signed ledger head, kept where a rollback of the ledger's own
directory does not reach (``paths.head_witness``: another volume, a mounted share).

The ledger's head guards against entries cut off its end, but an old copy of the ledger
restored together with its old head verifies: the entries spent since are forgotten, and the
next rounds spend them again. The witness is written after every append, after the head, and
checked whenever the site verifies its ledger: a ledger that holds fewer entries than the
witness, or other ones, is refused. A witness one entry behind is what a crash between the two
writes leaves, and is accepted like a head one entry behind.

A missing witness while the ledger has entries is refused too: deleting it must not be a way
round it. A new witness location is recorded on purpose with ``medfed privacy witness``.
It does not protect against someone who can rewrite both volumes (root on the site host): the
aggregator's copy of the ledger and the audit catch that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.errors import LedgerError
from medfed.privacy.keys import key_id
from medfed.privacy.ledger_head import check_head
from medfed.storage import make_private_dirs, read_bytes, read_json_object, replace_file

_RECORD_HINT = (
    "if the witness location is new (or moved), record the current head there with "
    "`medfed privacy witness --config SITE.yaml`; otherwise restore the newest ledger"
)


@dataclass(frozen=True)
class HeadWitness:
    """The witness of one site's ledger head in ``directory``."""

    directory: Path
    site_id: str

    @property
    def path(self) -> Path:
        return self.directory / f"{self.site_id}.ledger.head"

    def record(self, head: bytes) -> None:
        """Replace the witness with ``head`` (the bytes of the ledger's signed head file)."""
        make_private_dirs(self.directory)
        replace_file(self.path, head, mode=0o600)

    def check(self, *, ledger_path: Path, entries: int, public_key: Ed25519PublicKey) -> None:
        """Refuse a ledger of ``entries`` entries that the witness says was rolled back."""
        try:
            head = read_json_object(self.path) if self.path.exists() else None
        except (OSError, ValueError):
            raise self._failure("cannot be read", hint=_RECORD_HINT) from None
        if head is None:
            if entries:
                raise self._failure(
                    f"is missing while the ledger {ledger_path} holds {entries} entries",
                    hint=_RECORD_HINT,
                )
            return
        count = head.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count > entries:
            raise self._failure(
                f"records {count} entries but the ledger {ledger_path} holds {entries}: the "
                "ledger was rolled back (an older copy restored)",
                hint="restore the newest copy of the ledger and its .head file; the entries "
                "spent since the old copy must stay counted",
            )
        data = read_bytes(ledger_path)
        lines = data.split(b"\n")[:entries]
        try:
            check_head(ledger_path, head, lines, public_key, key_id(public_key), self.site_id)
        except LedgerError as exc:
            raise self._failure(
                f"does not match the ledger: {exc.message}", hint=exc.hint or _RECORD_HINT
            ) from None

    def _failure(self, problem: str, *, hint: str) -> LedgerError:
        return LedgerError(f"head witness {self.path}: {problem}", hint=hint)
