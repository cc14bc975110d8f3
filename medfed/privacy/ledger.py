"""The site's privacy ledger: verification of the signed hash chain and budget-checked appends.

The ledger is append-only JSON Lines (see :mod:`medfed.privacy.events`). A signed head file
next to it records the number of entries and the hash of the last line, so that cutting
entries off the end is detected. Epsilon is never stored: it is recomputed from the reserve
entries, each counted with its committed steps, or in full while uncommitted.

A head exactly one entry behind a ledger whose extra last line verifies is accepted: that is
what a crash between appending a line and replacing the head leaves, and the extra entry can
only add to the privacy spent. The next append rewrites the head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError
from medfed.privacy.accounting import DPSteps
from medfed.privacy.events import (
    GENESIS_HASH,
    LEDGER_VERSION,
    CommitEntry,
    EntryFormatError,
    LedgerEntry,
    ReserveEntry,
    canonical_json,
    line_hash,
    parse_entry,
    sign,
    signature_valid,
)
from medfed.privacy.keys import key_id
from medfed.privacy.storage import head_path, read_bytes, read_json_object, replace_file

RESTORE_HINT = (
    "restore the ledger and its .head file together from the site's backup and verify again; "
    "never edit a ledger by hand"
)
_HEAD_FIELDS = frozenset({"v", "kind", "site_id", "key_id", "count", "last_hash", "signature"})


@dataclass(frozen=True, slots=True)
class ReservationState:
    """One reserved round as the ledger records it, with its commit if there is one."""

    seq: int
    run_id: str
    round: int
    reserved_steps: int
    committed_steps: int | None
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    dataset_size: int
    accountant: str
    timestamp: str

    @property
    def committed(self) -> bool:
        """Whether training reported back the steps it took."""
        return self.committed_steps is not None

    @property
    def counted_steps(self) -> int:
        """Steps the accountant charges: the committed ones, or all reserved while open."""
        return self.reserved_steps if self.committed_steps is None else self.committed_steps


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """What a verified ledger holds."""

    path: Path
    site_id: str | None
    key_id: str | None
    entries: tuple[LedgerEntry, ...]
    reservations: tuple[ReservationState, ...]
    last_hash: str
    head_lagging: bool = False

    @property
    def history(self) -> tuple[DPSteps, ...]:
        """DP-SGD steps to compose: one entry per reservation, in ledger order."""
        return tuple(
            DPSteps(
                noise_multiplier=item.noise_multiplier,
                sample_rate=item.sample_rate,
                steps=item.counted_steps,
            )
            for item in self.reservations
        )

    @property
    def open_reservations(self) -> tuple[ReservationState, ...]:
        """Reservations without a commit (counted in full)."""
        return tuple(item for item in self.reservations if not item.committed)


def verify_ledger(
    path: Path, *, public_key: Ed25519PublicKey, site_id: str | None = None
) -> LedgerReport:
    """Verify a ledger and its head; raise LedgerError naming the first bad entry.

    With ``site_id`` every entry must belong to that site; without it, to one same site.
    A missing ledger with no head is an empty, valid ledger.
    """
    path = Path(path)
    return _verify(path, read_bytes(path), read_json_object(head_path(path)), public_key, site_id)


def verify_ledger_bytes(
    data: bytes, *, public_key: Ed25519PublicKey, site_id: str | None = None, source: str
) -> LedgerReport:
    """Verify a ledger's bytes as :func:`verify_ledger` does, but without a head file.

    For a copy of a site's ledger kept elsewhere (the aggregator's): the copy holder knows how
    many entries it has seen, which is what the head guards at the site. ``source`` names
    the data in errors and becomes the report's ``path``.
    """
    return _verify(Path(source), data, None, public_key, site_id, with_head=False)


def _fail(path: Path, where: str, problem: str) -> LedgerError:
    return LedgerError(f"{path}: {where}: {problem}", hint=RESTORE_HINT)


def _verify(
    path: Path,
    data: bytes,
    head: dict[str, Any] | None,
    public_key: Ed25519PublicKey,
    site_id: str | None,
    *,
    with_head: bool = True,
) -> LedgerReport:
    expected_key = key_id(public_key)
    chunks = data.split(b"\n")
    if chunks[-1]:
        line_no = len(chunks)
        raise _fail(
            path,
            f"line {line_no}",
            f"incomplete last line ({len(chunks[-1])} bytes without a newline): a write was "
            "interrupted or the file was cut",
        )
    lines = chunks[:-1]
    entries: list[LedgerEntry] = []
    reserves: dict[int, ReserveEntry] = {}
    commits: dict[int, CommitEntry] = {}
    previous = GENESIS_HASH
    for index, raw in enumerate(lines):
        where = f"line {index + 1}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(path, where, "not valid JSON (a torn or edited line)") from None
        seq = obj.get("seq") if isinstance(obj, dict) else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            where += f" (seq {seq})"
        try:
            entry = parse_entry(obj)
        except EntryFormatError as exc:
            raise _fail(path, where, str(exc)) from None
        if entry.seq != index:
            raise _fail(
                path,
                where,
                f"seq {entry.seq} where seq {index} was expected: an entry was removed, "
                "duplicated or moved",
            )
        if entry.prev_hash != previous:
            raise _fail(
                path, where, "hash chain broken: prev_hash does not match the line before it"
            )
        if entry.key_id != expected_key:
            raise _fail(
                path, where, f"signed by key {entry.key_id}, not by this site's key {expected_key}"
            )
        if not signature_valid(obj, public_key):
            raise _fail(path, where, "bad signature: the entry was changed after it was signed")
        if canonical_json(obj) != raw:
            raise _fail(path, where, "not in canonical form: the line was rewritten by hand")
        site_id = site_id or entry.site_id
        if entry.site_id != site_id:
            raise _fail(path, where, f"entry of site {entry.site_id!r}, expected {site_id!r}")
        if isinstance(entry, ReserveEntry):
            reserves[entry.seq] = entry
        else:
            _check_commit(path, where, entry, reserves, commits)
            commits[entry.reservation_seq] = entry
        entries.append(entry)
        previous = line_hash(raw)
    lagging = with_head and _check_head(path, head, lines, public_key, expected_key, site_id)
    reservations = tuple(
        _reservation_state(entry, commits.get(seq)) for seq, entry in reserves.items()
    )
    return LedgerReport(
        path=path,
        site_id=site_id,
        key_id=expected_key,
        entries=tuple(entries),
        reservations=reservations,
        last_hash=previous,
        head_lagging=lagging,
    )


def _check_commit(
    path: Path,
    where: str,
    entry: CommitEntry,
    reserves: dict[int, ReserveEntry],
    commits: dict[int, CommitEntry],
) -> None:
    reserved = reserves.get(entry.reservation_seq)
    if reserved is None:
        raise _fail(
            path, where, f"commit refers to seq {entry.reservation_seq}, which is no reservation"
        )
    if entry.reservation_seq in commits:
        earlier = commits[entry.reservation_seq].seq
        raise _fail(
            path,
            where,
            f"reservation seq {entry.reservation_seq} was already committed at seq {earlier}",
        )
    if entry.steps > reserved.steps:
        raise _fail(
            path,
            where,
            f"commit of {entry.steps} steps exceeds the {reserved.steps} steps reserved at "
            f"seq {entry.reservation_seq}",
        )


def _check_head(
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
            raise _fail(path, where, f"missing while the ledger holds {len(lines)} entries")
        return False
    if set(head) != _HEAD_FIELDS or head.get("v") != LEDGER_VERSION or head["kind"] != "head":
        raise _fail(path, where, "not a ledger head (wrong fields or format)")
    count, last = head["count"], head["last_hash"]
    if isinstance(count, bool) or not isinstance(count, int) or not isinstance(last, str):
        raise _fail(path, where, "count or last_hash has the wrong type")
    if head["key_id"] != expected_key or not signature_valid(head, public_key):
        raise _fail(path, where, "bad signature or foreign key: the head was not written here")
    if lines and head["site_id"] != site_id:
        raise _fail(path, where, f"belongs to site {head['site_id']!r}, expected {site_id!r}")
    total = len(lines)
    if count > total:
        raise _fail(
            path,
            where,
            f"records {count} entries but the ledger holds {total}: entries were cut off the "
            f"end (first missing: line {total + 1}, seq {total})",
        )
    if count < total - 1:
        raise _fail(
            path,
            where,
            f"records {count} entries but the ledger holds {total}: lines {count + 1} to "
            f"{total} were added without updating the head",
        )
    hashes = [GENESIS_HASH, *(line_hash(raw) for raw in lines)]
    if last != hashes[count]:
        raise _fail(
            path,
            where,
            f"the last entry it records (line {count}) differs from the ledger's: the ledger "
            "was rewritten",
        )
    return count == total - 1


def _reservation_state(entry: ReserveEntry, commit: CommitEntry | None) -> ReservationState:
    return ReservationState(
        seq=entry.seq,
        run_id=entry.run_id,
        round=entry.round,
        reserved_steps=entry.steps,
        committed_steps=None if commit is None else commit.steps,
        sample_rate=entry.sample_rate,
        noise_multiplier=entry.noise_multiplier,
        max_grad_norm=entry.max_grad_norm,
        delta=entry.delta,
        dataset_size=entry.dataset_size,
        accountant=entry.accountant,
        timestamp=entry.timestamp,
    )


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
