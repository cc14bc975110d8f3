"""The aggregator's copy of every site's privacy ledger, and each site's budget computed from it.

A site sends, with each reply, the lines of its ledger that the aggregator does not hold yet.
They are verified against the aggregator's copy and the site's registered public key *before*
anything is stored, so that once the aggregator has seen an entry, a site can no longer roll
its ledger back, rewrite it or start a new one without being noticed. Epsilon is recomputed
from the copy, never taken from a number the site reports, with the accountant, at the delta
and against the cap that the site's signed terms entries name: a site that raises its cap or
its delta is flagged (:attr:`Receipt.alerts`), and so is a cap above the one the federation
agreed with it (``caps``).

The copies outlive the aggregator process: a new tracker on the same directory re-verifies and
loads them, so a restart does not forget the privacy a site has spent. Files in ``directory``
(created 0700)::

    <site>.ledger.jsonl       the exact lines received, in order (no head file: the aggregator
                              itself knows how many entries it holds)
    <site>.ledger.jsonl.lock  serialises writers of one copy

One tracker should own a directory; the lock only keeps a second one from tearing a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.errors import BudgetExceededError, ConfigError, LedgerError, PrivacyError
from medfed.numbers import finite_or_none
from medfed.privacy.accounting import AccountantName, DPSteps, compute_epsilon
from medfed.privacy.budget import BudgetCap, PrivacyTerms, check_budget
from medfed.privacy.ledger import LedgerReport, verify_ledger_bytes
from medfed.storage import (
    locked,
    make_private_dirs,
    read_bytes,
    replace_file,
)
from medfed.workspace import SITE_ID_PATTERN, ledger_copy_file

_SENT_HINT: Final = (
    "nothing was stored and the site's update should not be used; run `medfed privacy ledger` "
    "at the site, and check that its ledger_key.pub is the one in the aggregator's workspace"
)
_COPY_HINT: Final = (
    "the aggregator's copy changed on disk or the site's registered ledger key changed: restore "
    "the copy from the aggregator's backup (never edit or delete it; a deleted copy lets the "
    "site start its budget over)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteBudget:
    """What the aggregator knows about one site's privacy, from its own verified copy."""

    site_id: str
    entries: int
    epsilon_spent: float
    epsilon_cap: float
    delta: float
    accountant: AccountantName
    last_hash: str
    # With distributed-noise steps in the ledger: both guarantees, and the one the cap holds on
    # (``epsilon_spent`` is that one).
    epsilon_distributed: float | None = None
    epsilon_local: float | None = None
    budget_view: str | None = None

    @property
    def remaining(self) -> float:
        """Epsilon left before the cap (0 when spent or over)."""
        return max(self.epsilon_cap - self.epsilon_spent, 0.0)

    @property
    def exhausted(self) -> bool:
        """True when nothing is left: the site cannot train another step within its cap."""
        return self.epsilon_spent >= self.epsilon_cap

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (an unbounded epsilon is written as null, as JSON has no inf)."""
        return {
            "site_id": self.site_id,
            "entries": self.entries,
            "epsilon_spent": finite_or_none(self.epsilon_spent),
            "epsilon_cap": self.epsilon_cap,
            "remaining": self.remaining,
            "exhausted": self.exhausted,
            "delta": self.delta,
            "accountant": self.accountant,
            "last_hash": self.last_hash,
            **self._views(),
        }

    def _views(self) -> dict[str, Any]:
        if self.budget_view is None:
            return {}
        return {
            "epsilon_distributed": finite_or_none(self.epsilon_distributed),
            "epsilon_local": finite_or_none(self.epsilon_local),
            "budget_view": self.budget_view,
        }


@dataclass(frozen=True, slots=True)
class Receipt:
    """What :meth:`BudgetTracker.receive` stored: the budget now, and what needs attention."""

    budget: SiteBudget
    new_entries: int
    alerts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Copy:
    """One site's copy as verified: its exact bytes and what they hold."""

    data: bytes
    report: LedgerReport


class BudgetTracker:
    """Keeps a verified copy of each registered site's ledger and the budget it implies.

    ``public_keys`` are the sites' registered ledger keys (``Workspace.ledger_public_key``); a
    site without one cannot send entries. A site's budget is kept under the terms its ledger
    names (accountant, delta, cap). ``caps`` are caps the federation agreed with its sites: a
    ledger whose cap is above its agreed one is flagged, and for a format-1 ledger that has
    no terms entry yet the agreed cap (RDP, at the ledger's strictest delta) stands in.
    """

    def __init__(
        self,
        *,
        directory: Path,
        public_keys: Mapping[str, Ed25519PublicKey],
        caps: Mapping[str, BudgetCap] | None = None,
    ) -> None:
        self._directory = Path(directory)
        self._keys = _checked_keys(public_keys)
        self._configured_caps = dict(caps or {})
        for site_id, cap in self._configured_caps.items():
            if site_id not in self._keys:
                raise ConfigError(f"a cap is configured for site {site_id!r}, which has no key")
            if not isinstance(cap, BudgetCap):
                raise ConfigError(f"cap of site {site_id!r} is not a BudgetCap: {cap!r}")
        self._copies: dict[str, _Copy] = {}
        self._spent: dict[str, tuple[str, PrivacyTerms, float]] = {}  # site: (last_hash, ...)
        self._mutex = threading.Lock()
        make_private_dirs(self._directory)
        for site_id in sorted(self._keys):
            with locked(self._ledger_path(site_id), exclusive=False):
                self._copies[site_id] = self._read_copy(site_id)

    @property
    def directory(self) -> Path:
        """Where the copies are kept."""
        return self._directory

    def report(self, site_id: str) -> LedgerReport:
        """The verified copy of the site's ledger."""
        self._key(site_id)
        return self._copies[site_id].report

    def terms(self, site_id: str) -> PrivacyTerms | None:
        """The terms the site's budget is kept under (None while none is known)."""
        self._key(site_id)
        report = self._copies[site_id].report
        if report.terms is not None:
            return report.terms
        agreed, delta = self._configured_caps.get(site_id), report.legacy_delta
        if agreed is None:
            return None
        return PrivacyTerms(
            accountant="rdp", delta=delta or agreed.delta, epsilon_cap=agreed.epsilon
        )

    def alerts(self, site_id: str, *, since: int = 0) -> tuple[str, ...]:
        """Terms changes from entry ``since`` on that raised the cap or the delta, and a cap
        above the agreed one."""
        report = self.report(site_id)
        found = []
        for change in report.terms_changes:
            if change.seq < since:
                continue
            if change.raised:
                found.append(f"site {site_id} raised its {change.raised}: {change.describe()}")
            agreed = self._configured_caps.get(site_id)
            if agreed is not None and change.after.epsilon_cap > agreed.epsilon:
                found.append(
                    f"site {site_id}'s ledger names cap {change.after.epsilon_cap:g} (seq "
                    f"{change.seq}), above the {agreed.epsilon:g} agreed with it"
                )
        return tuple(found)

    def known_entries(self, site_id: str) -> int:
        """How many entries the aggregator holds: the site sends its ledger from this seq on."""
        self._key(site_id)
        return len(self._copies[site_id].report.entries)

    def receive(self, *, site_id: str, first_seq: int, lines: Sequence[str]) -> Receipt:
        """Verify and store the ledger lines a site sent from ``first_seq`` on.

        Nothing is stored unless every line verifies as the continuation of the copy: seq,
        hash chain, canonical form, the site's registered key and signature, the site's id,
        and commits that close an open reservation of no more steps than it reserved.
        ``lines`` may be empty (nothing new).
        """
        public_key = self._key(site_id)
        if isinstance(first_seq, bool) or not isinstance(first_seq, int):
            raise LedgerError(
                f"site {site_id!r} sent a first seq that is no integer: {first_seq!r}"
            )
        new = _encode_lines(site_id, first_seq, lines)
        path = self._ledger_path(site_id)
        with self._mutex, locked(path, exclusive=True):
            held = self._current_copy(site_id)
            count = len(held.report.entries)
            if first_seq != count:
                raise _sequence_error(site_id, first_seq, count)
            if new:
                data = held.data + new
                try:
                    report = verify_ledger_bytes(
                        data,
                        public_key=public_key,
                        site_id=site_id,
                        source=f"ledger of site {site_id!r}",
                    )
                except LedgerError as exc:
                    raise LedgerError(
                        f"{exc.message} (in the {len(lines)} entries the site sent from seq "
                        f"{first_seq}; the aggregator holds {count})",
                        hint=_SENT_HINT,
                    ) from None
                replace_file(path, data, mode=0o600)
                self._copies[site_id] = _Copy(data=data, report=report)
        return Receipt(
            budget=self.budget(site_id),
            new_entries=len(lines),
            alerts=self.alerts(site_id, since=count),
        )

    def budget(self, site_id: str) -> SiteBudget:
        """The site's budget from the copy; PrivacyError while no terms are known for it."""
        terms = self._terms(site_id)
        report = self._copies[site_id].report
        views: dict[str, Any] = {}
        budget_view = report.budget_view
        if budget_view is not None:
            spent = report.view_epsilons(delta=terms.delta, accountant=terms.accountant)
            views = {f"epsilon_{view}": value for view, value in spent.items()}
            views["budget_view"] = budget_view
        return SiteBudget(
            site_id=site_id,
            entries=len(report.entries),
            epsilon_spent=self._epsilon(site_id, report, terms),
            epsilon_cap=terms.epsilon_cap,
            delta=terms.delta,
            accountant=terms.accountant,
            last_hash=report.last_hash,
            **views,
        )

    def can_afford(self, *, site_id: str, planned: DPSteps) -> bool:
        """Whether ``planned`` steps on top of the site's history would stay within its cap.

        The same composition the site runs before it reserves a round (its own accountant,
        delta and cap), so the aggregator need not send work a site will refuse.
        """
        terms = self._terms(site_id)
        history = self._copies[site_id].report.history
        try:
            check_budget(
                history=history, planned=planned, cap=terms.cap, accountant=terms.accountant
            )
        except BudgetExceededError:
            return False
        return True

    def all(self) -> dict[str, SiteBudget]:
        """Budgets of every registered site whose cap is known, by site id."""
        return {
            site_id: self.budget(site_id)
            for site_id in sorted(self._keys)
            if self.terms(site_id) is not None
        }

    def state_json(self) -> dict[str, Any]:
        """A JSON-ready summary of every site's budget, for the run's output directory."""
        return {
            "ledger_copies": str(self._directory),
            "sites": {site_id: budget.to_json() for site_id, budget in self.all().items()},
            "sites_without_cap": {
                site_id: {
                    "entries": self.known_entries(site_id),
                    "last_hash": self._copies[site_id].report.last_hash,
                }
                for site_id in sorted(self._keys)
                if self.terms(site_id) is None
            },
        }

    # Internals -----------------------------------------------------------------------------

    def _key(self, site_id: str) -> Ed25519PublicKey:
        key = self._keys.get(site_id)
        if key is None:
            known = ", ".join(sorted(self._keys)) or "none"
            raise LedgerError(
                f"site {site_id!r} has no registered ledger key at the aggregator",
                hint=f"registered sites: {known}; add the site to the workspace "
                "(`medfed provision`) before accepting its updates",
            )
        return key

    def _terms(self, site_id: str) -> PrivacyTerms:
        terms = self.terms(site_id)
        if terms is None:
            raise PrivacyError(
                f"no privacy terms are known for site {site_id!r}: its ledger has no terms entry "
                "yet",
                hint="wait for the site's first reply, which carries its terms",
            )
        return terms

    def _epsilon(self, site_id: str, report: LedgerReport, terms: PrivacyTerms) -> float:
        """Epsilon of the copy, computed again only when the copy or the terms changed."""
        cached = self._spent.get(site_id)
        if cached is not None and cached[:2] == (report.last_hash, terms):
            return cached[2]
        spent = compute_epsilon(
            history=report.history, delta=terms.delta, accountant=terms.accountant
        )
        self._spent[site_id] = (report.last_hash, terms, spent)
        return spent

    def _ledger_path(self, site_id: str) -> Path:
        return ledger_copy_file(self._directory, site_id)

    def _read_copy(self, site_id: str) -> _Copy:
        path = self._ledger_path(site_id)
        data = read_bytes(path)
        try:
            report = verify_ledger_bytes(
                data, public_key=self._keys[site_id], site_id=site_id, source=str(path)
            )
        except LedgerError as exc:
            raise LedgerError(
                f"the aggregator's copy of site {site_id!r}'s ledger does not verify: "
                f"{exc.message}",
                hint=_COPY_HINT,
            ) from None
        return _Copy(data=data, report=report)

    def _current_copy(self, site_id: str) -> _Copy:
        """The copy as on disk now, which must still begin with everything verified before.

        Entries appended by another writer are verified and kept; a copy that lost or changed
        entries the tracker had verified is refused, since that would let a site roll back.
        """
        held = self._copies[site_id]
        data = read_bytes(self._ledger_path(site_id))
        if data == held.data:
            return held
        if not data.startswith(held.data):
            raise LedgerError(
                f"the aggregator's copy of site {site_id!r}'s ledger "
                f"({self._ledger_path(site_id)}) changed on disk: it no longer begins with the "
                f"{len(held.report.entries)} entries verified before",
                hint=_COPY_HINT,
            )
        held = self._read_copy(site_id)
        self._copies[site_id] = held
        return held


def _checked_keys(public_keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """The registered keys, refusing ids that are no safe file name or that fold together."""
    keys: dict[str, Ed25519PublicKey] = {}
    folded: dict[str, str] = {}
    for site_id, key in public_keys.items():
        if not isinstance(site_id, str) or not SITE_ID_PATTERN.match(site_id):
            raise ConfigError(
                f"{site_id!r} is not a valid site id",
                hint="use the site ids of the workspace (`medfed provision`)",
            )
        other = folded.setdefault(site_id.casefold(), site_id)
        if other != site_id:
            raise ConfigError(f"site id {site_id!r} duplicates {other!r} (ignoring case)")
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(
                f"the ledger key of site {site_id!r} is not an Ed25519 public key",
                hint="use Workspace.ledger_public_key(site_id)",
            )
        keys[site_id] = key
    return keys


def _encode_lines(site_id: str, first_seq: int, lines: Sequence[str]) -> bytes:
    """The lines as they are stored: each newline-terminated, byte for byte as the site wrote."""
    if isinstance(lines, str | bytes):
        raise LedgerError(f"site {site_id!r} sent its ledger lines as one string, not a list")
    encoded: list[bytes] = []
    for offset, line in enumerate(lines):
        where = f"site {site_id!r} sent a bad ledger line for seq {first_seq + offset}"
        if not isinstance(line, str):
            raise LedgerError(f"{where}: not a string", hint=_SENT_HINT)
        if "\n" in line or "\r" in line:
            raise LedgerError(f"{where}: it holds a line break", hint=_SENT_HINT)
        try:
            encoded.append(line.encode("ascii") + b"\n")
        except UnicodeEncodeError:
            raise LedgerError(
                f"{where}: not ASCII, so not a canonical ledger line", hint=_SENT_HINT
            ) from None
    return b"".join(encoded)


def _sequence_error(site_id: str, first_seq: int, held: int) -> LedgerError:
    if first_seq < held:
        return LedgerError(
            f"site {site_id!r} sent entries from seq {first_seq} but the aggregator holds "
            f"{held}: the site's ledger was rolled back or replaced",
            hint="restore the site's ledger from its backup (it must hold every entry the "
            "aggregator has); a site that starts a new ledger would spend its budget again",
        )
    return LedgerError(
        f"site {site_id!r} sent entries from seq {first_seq} but the aggregator holds "
        f"{held}: entries {held} to {first_seq - 1} are missing",
        hint=f"the site must send its ledger from seq {held} (known_entries)",
    )
