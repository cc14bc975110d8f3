"""The site's privacy ledger verified: the signed hash chain, line by line, and what it says.

The ledger is append-only JSON Lines (see :mod:`medfed.privacy.events`), with a signed head
file next to it (:mod:`medfed.privacy.ledger_head`) so that cutting entries off the end is
detected. Epsilon is never stored: it is recomputed from the reserve entries, each counted with
its committed steps, or in full while uncommitted, and from the Gaussian releases.

A distributed-noise reservation (:mod:`medfed.privacy.distributed_noise`) stores its
parameters and the Gaussian equivalents of both its guarantees; the verifier recomputes them,
checks that the entry charges the one its budget names, and that the ledger's accountant is an
RDP one, the only kind those equivalents bound.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.errors import PrivacyError
from medfed.privacy.accounting import AccountantName, DPSteps, compute_epsilon
from medfed.privacy.budget import PrivacyTerms
from medfed.privacy.distributed_noise import (
    BUDGET_VIEWS,
    RDP_ACCOUNTANTS,
    BudgetView,
    DistributedPlan,
)
from medfed.privacy.entry_format import EntryFormatError, parse_entry
from medfed.privacy.events import (
    GENESIS_HASH,
    CommitEntry,
    LedgerEntry,
    ReleaseEntry,
    ReserveEntry,
    TermsEntry,
    canonical_json,
    line_hash,
    signature_valid,
)
from medfed.privacy.keys import key_id
from medfed.privacy.ledger_head import check_head, head_path, ledger_failure
from medfed.storage import read_bytes, read_json_object

# Stored Gaussian equivalents may differ from a recomputation by floating-point noise only.
MULTIPLIER_TOLERANCE: Final = 1e-9


@dataclass(frozen=True, slots=True)
class ReservationState:
    """One reserved round as the ledger records it, with its commit if there is one."""

    seq: int
    run_id: str
    round: int
    planned_rounds: int | None
    reserved_steps: int
    committed_steps: int | None
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    timestamp: str

    @property
    def committed(self) -> bool:
        """Whether training reported back the steps it took."""
        return self.committed_steps is not None

    @property
    def counted_steps(self) -> int:
        """Steps the accountant charges: the committed ones, or all reserved while open."""
        return self.reserved_steps if self.committed_steps is None else self.committed_steps

    @property
    def dp_steps(self) -> DPSteps:
        """What the accountant charges for it."""
        return DPSteps(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.counted_steps,
        )

    @property
    def planned_steps(self) -> DPSteps:
        """The round as it was planned (what another round like it would cost)."""
        return DPSteps(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.reserved_steps,
        )


@dataclass(frozen=True, slots=True)
class Charge:
    """One entry that costs privacy: a reservation's steps or a Gaussian release."""

    seq: int
    kind: str  # "reserve" or "release"
    run_id: str
    round: int
    steps: DPSteps


@dataclass(frozen=True, slots=True)
class TermsChange:
    """A terms entry, with the terms it replaced (None for the first)."""

    seq: int
    timestamp: str
    before: PrivacyTerms | None
    after: PrivacyTerms

    @property
    def cap_raised(self) -> bool:
        return self.before is not None and self.after.epsilon_cap > self.before.epsilon_cap

    @property
    def delta_raised(self) -> bool:
        return self.before is not None and self.after.delta > self.before.delta

    @property
    def accountant_changed(self) -> bool:
        return self.before is not None and self.after.accountant != self.before.accountant

    @property
    def raised(self) -> str:
        """What the change raised: "cap", "delta", "cap and delta", or "" (nothing)."""
        names = [n for n, up in (("cap", self.cap_raised), ("delta", self.delta_raised)) if up]
        return " and ".join(names)

    def describe(self) -> str:
        if self.before is None:
            return f"terms set at seq {self.seq}: {self.after.describe()}"
        before, after = self.before.describe(), self.after.describe()
        return f"terms changed at seq {self.seq}: {before} -> {after}"


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """What a verified ledger holds.

    ``terms`` are the latest terms entry's (None for a format-1 ledger that has none yet);
    ``history`` is what the accountant composes: every reservation (committed steps, or all
    reserved while open) and every Gaussian release, in ledger order. A distributed-noise
    reservation is charged there at the multiplier its site's budget is enforced on;
    :meth:`history_of` charges it at the distributed or the local guarantee instead.
    """

    path: Path
    site_id: str | None
    key_id: str | None
    entries: tuple[LedgerEntry, ...]
    reservations: tuple[ReservationState, ...]
    releases: tuple[ReleaseEntry, ...]
    terms_changes: tuple[TermsChange, ...]
    last_hash: str
    head_lagging: bool = False

    @property
    def terms(self) -> PrivacyTerms | None:
        return self.terms_changes[-1].after if self.terms_changes else None

    @property
    def charges(self) -> tuple[Charge, ...]:
        """Everything that costs privacy, in ledger order."""
        items = [
            Charge(seq=r.seq, kind="reserve", run_id=r.run_id, round=r.round, steps=r.dp_steps)
            for r in self.reservations
        ]
        items += [
            Charge(
                seq=r.seq,
                kind="release",
                run_id=r.run_id,
                round=r.round,
                steps=release_steps(r),
            )
            for r in self.releases
            if r.mechanism == "gaussian"
        ]
        return tuple(sorted(items, key=lambda charge: charge.seq))

    @property
    def history(self) -> tuple[DPSteps, ...]:
        """DP steps to compose, in ledger order."""
        return tuple(charge.steps for charge in self.charges)

    @property
    def distributed_plans(self) -> Mapping[int, DistributedPlan]:
        """Seq -> plan of every distributed-noise reservation (checked when verified)."""
        return {
            entry.seq: DistributedPlan.from_json(entry.distributed)
            for entry in self.entries
            if isinstance(entry, ReserveEntry) and entry.distributed is not None
        }

    @property
    def has_distributed(self) -> bool:
        """Whether any reservation is a distributed-noise step."""
        return any(
            isinstance(entry, ReserveEntry) and entry.distributed is not None
            for entry in self.entries
        )

    def history_of(self, view: BudgetView) -> tuple[DPSteps, ...]:
        """:attr:`history` with each distributed reservation charged at ``view``'s multiplier.

        ``"distributed"``: at least the plan's sites added their share and secure aggregation
        held; ``"local"``: the site's own share alone. The multipliers are the ones the entry
        stores (verification has checked them against the parameters); other entries are
        charged as in :attr:`history`.
        """
        if view not in BUDGET_VIEWS:
            raise PrivacyError(
                f"unknown privacy view {view!r}", hint=f"use one of: {', '.join(BUDGET_VIEWS)}"
            )
        stored = {
            entry.seq: float(entry.distributed[f"{view}_noise_multiplier"])
            for entry in self.entries
            if isinstance(entry, ReserveEntry) and entry.distributed is not None
        }
        return tuple(
            dataclasses.replace(charge.steps, noise_multiplier=stored[charge.seq])
            if charge.kind == "reserve" and charge.seq in stored
            else charge.steps
            for charge in self.charges
        )

    def view_epsilons(self, *, delta: float, accountant: AccountantName) -> dict[BudgetView, float]:
        """Epsilon of each guarantee (:meth:`history_of`) at ``delta`` in ``accountant``."""
        return {
            view: compute_epsilon(history=self.history_of(view), delta=delta, accountant=accountant)
            for view in BUDGET_VIEWS
        }

    @property
    def budget_view(self) -> BudgetView | None:
        """The guarantee the latest distributed-noise reservation holds the cap on (None
        without one)."""
        plans = self.distributed_plans
        return plans[max(plans)].budget if plans else None

    @property
    def open_reservations(self) -> tuple[ReservationState, ...]:
        """Reservations without a commit (counted in full)."""
        return tuple(item for item in self.reservations if not item.committed)

    @property
    def legacy_delta(self) -> float | None:
        """The smallest delta format-1 reservations name (the strictest), if any."""
        deltas = [
            entry.legacy_delta
            for entry in self.entries
            if isinstance(entry, ReserveEntry) and entry.legacy_delta is not None
        ]
        return min(deltas) if deltas else None

    def runs(self, run_id: str) -> tuple[ReservationState, ...]:
        """The reservations of one run, in ledger order."""
        return tuple(r for r in self.reservations if r.run_id == run_id)

    def releases_of(
        self, *, quantity: str, run_id: str | None = None, round: int | None = None
    ) -> tuple[ReleaseEntry, ...]:
        """Release entries of ``quantity`` (of one run, of one round), in ledger order."""
        return tuple(
            r
            for r in self.releases
            if r.quantity == quantity
            and (run_id is None or r.run_id == run_id)
            and (round is None or r.round == round)
        )

    def latest_release(self, quantity: str) -> ReleaseEntry | None:
        found = self.releases_of(quantity=quantity)
        return found[-1] if found else None


def release_steps(release: ReleaseEntry) -> DPSteps:
    """A Gaussian release as accountant input: one unsampled step at its noise multiplier."""
    assert release.mechanism == "gaussian" and release.noise_multiplier is not None
    return DPSteps(noise_multiplier=release.noise_multiplier, sample_rate=1.0, steps=1)


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
        raise ledger_failure(
            path,
            f"line {line_no}",
            f"incomplete last line ({len(chunks[-1])} bytes without a newline): a write was "
            "interrupted or the file was cut",
        )
    lines = chunks[:-1]
    state = _Chain()
    previous = GENESIS_HASH
    for index, raw in enumerate(lines):
        where = f"line {index + 1}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ledger_failure(path, where, "not valid JSON (a torn or edited line)") from None
        seq = obj.get("seq") if isinstance(obj, dict) else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            where += f" (seq {seq})"
        try:
            entry = parse_entry(obj)
        except EntryFormatError as exc:
            raise ledger_failure(path, where, str(exc)) from None
        if entry.seq != index:
            raise ledger_failure(
                path,
                where,
                f"seq {entry.seq} where seq {index} was expected: an entry was removed, "
                "duplicated or moved",
            )
        if entry.prev_hash != previous:
            raise ledger_failure(
                path, where, "hash chain broken: prev_hash does not match the line before it"
            )
        if entry.key_id != expected_key:
            raise ledger_failure(
                path, where, f"signed by key {entry.key_id}, not by this site's key {expected_key}"
            )
        if not signature_valid(obj, public_key):
            raise ledger_failure(
                path, where, "bad signature: the entry was changed after it was signed"
            )
        if canonical_json(obj) != raw:
            raise ledger_failure(
                path, where, "not in canonical form: the line was rewritten by hand"
            )
        site_id = site_id or entry.site_id
        if entry.site_id != site_id:
            raise ledger_failure(
                path, where, f"entry of site {entry.site_id!r}, expected {site_id!r}"
            )
        problem = state.add(entry, version=obj["v"])
        if problem:
            raise ledger_failure(path, where, problem)
        previous = line_hash(raw)
    lagging = with_head and check_head(path, head, lines, public_key, expected_key, site_id)
    reservations = tuple(
        _reservation_state(entry, state.commits.get(seq)) for seq, entry in state.reserves.items()
    )
    return LedgerReport(
        path=path,
        site_id=site_id,
        key_id=expected_key,
        entries=tuple(state.entries),
        reservations=reservations,
        releases=tuple(state.releases),
        terms_changes=tuple(state.terms),
        last_hash=previous,
        head_lagging=lagging,
    )


@dataclass
class _Chain:
    """What the entries verified so far hold; ``add`` says what is wrong with the next one."""

    entries: list[LedgerEntry] = field(default_factory=list)
    reserves: dict[int, ReserveEntry] = field(default_factory=dict)
    commits: dict[int, CommitEntry] = field(default_factory=dict)
    releases: list[ReleaseEntry] = field(default_factory=list)
    terms: list[TermsChange] = field(default_factory=list)
    newest_version: int = 1

    def add(self, entry: LedgerEntry, *, version: int) -> str | None:
        if version < self.newest_version:
            return f"a format-{version} entry after format-{self.newest_version} entries"
        self.newest_version = version
        problem: str | None = None
        if isinstance(entry, TermsEntry):
            problem = self._terms_problem(entry)
            before = self.terms[-1].after if self.terms else None
            after = PrivacyTerms(
                accountant=entry.accountant,  # type: ignore[arg-type]
                delta=entry.delta,
                epsilon_cap=entry.epsilon_cap,
            )
            self.terms.append(
                TermsChange(seq=entry.seq, timestamp=entry.timestamp, before=before, after=after)
            )
        elif isinstance(entry, ReserveEntry):
            problem = self._needs_terms(version, "reservation") or self._distributed_problem(entry)
            self.reserves[entry.seq] = entry
        elif isinstance(entry, CommitEntry):
            problem = _commit_problem(entry, self.reserves, self.commits)
            self.commits[entry.reservation_seq] = entry
        else:
            problem = self._needs_terms(version, "release") or self._release_problem(entry)
            self.releases.append(entry)
        self.entries.append(entry)
        return problem

    def _needs_terms(self, version: int, what: str) -> str | None:
        if version >= 2 and not self.terms:
            return f"a {what} before any terms entry: the ledger names no accountant, delta or cap"
        return None

    def _distributed_problem(self, entry: ReserveEntry) -> str | None:
        """A distributed-noise step: one full-batch step, charged at a multiplier that holds.

        Its Gaussian equivalent bounds the step's RDP, nothing else: the step must be exactly
        one unsampled step, the stored multipliers must be those of the stored parameters, the
        charged one must be the one the budget names, and the ledger's accountant an RDP one.
        """
        if entry.distributed is None:
            return None
        stored = entry.distributed
        plan = DistributedPlan.from_json(stored)  # its fields were checked when parsed
        if entry.sample_rate != 1.0 or entry.steps != 1:
            return (
                f"a distributed-noise reservation with sample rate {entry.sample_rate!r} and "
                f"{entry.steps} steps: it is one full-batch step (sample rate 1.0, 1 step)"
            )
        if entry.count_noise_multiplier is not None:
            return "a distributed-noise reservation with adaptive clipping's count noise"
        for view in ("distributed", "local"):
            name = f"{view}_noise_multiplier"
            recomputed = plan.noise_multiplier(view)
            if abs(stored[name] - recomputed) > MULTIPLIER_TOLERANCE * recomputed:
                return (
                    f"{name} {stored[name]!r} is not the Gaussian equivalent of the stored "
                    f"parameters ({recomputed!r}): the entry's noise was misstated"
                )
        enforced = stored[f"{plan.budget}_noise_multiplier"]
        if entry.noise_multiplier != enforced:
            return (
                f"noise multiplier {entry.noise_multiplier!r} is not the {plan.budget} "
                f"guarantee's {enforced!r}, which the entry names as the one its budget is "
                "enforced on"
            )
        accountant = self.terms[-1].after.accountant if self.terms else None
        if accountant not in RDP_ACCOUNTANTS:
            return (
                f"a distributed-noise reservation under the {accountant} accountant: its "
                f"Gaussian equivalent bounds RDP only ({', '.join(RDP_ACCOUNTANTS)})"
            )
        return None

    def _terms_problem(self, entry: TermsEntry) -> str | None:
        """After a distributed-noise reservation the accountant must stay an RDP one."""
        if entry.accountant in RDP_ACCOUNTANTS:
            return None
        earlier = [seq for seq, r in self.reserves.items() if r.distributed is not None]
        if not earlier:
            return None
        return (
            f"terms switch to the {entry.accountant} accountant after distributed-noise "
            f"reservations (seq {', '.join(map(str, earlier))}), whose Gaussian equivalents "
            f"bound RDP only ({', '.join(RDP_ACCOUNTANTS)})"
        )

    def _release_problem(self, entry: ReleaseEntry) -> str | None:
        if entry.mechanism != "dp-sgd":
            return None
        seq = entry.reservation_seq
        reserved = None if seq is None else self.reserves.get(seq)
        if reserved is None or (reserved.run_id, reserved.round) != (entry.run_id, entry.round):
            return (
                f"a dp-sgd release of run {entry.run_id!r} round {entry.round} names seq {seq}, "
                "which is no reservation of that round"
            )
        if seq not in self.commits:
            return f"a dp-sgd release names reservation seq {seq} before its commit"
        return None


def _commit_problem(
    entry: CommitEntry, reserves: dict[int, ReserveEntry], commits: dict[int, CommitEntry]
) -> str | None:
    reserved = reserves.get(entry.reservation_seq)
    if reserved is None:
        return f"commit refers to seq {entry.reservation_seq}, which is no reservation"
    if entry.reservation_seq in commits:
        earlier = commits[entry.reservation_seq].seq
        return f"reservation seq {entry.reservation_seq} was already committed at seq {earlier}"
    if entry.steps > reserved.steps:
        return (
            f"commit of {entry.steps} steps exceeds the {reserved.steps} steps reserved at "
            f"seq {entry.reservation_seq}"
        )
    return None


def _reservation_state(entry: ReserveEntry, commit: CommitEntry | None) -> ReservationState:
    return ReservationState(
        seq=entry.seq,
        run_id=entry.run_id,
        round=entry.round,
        planned_rounds=entry.planned_rounds,
        reserved_steps=entry.steps,
        committed_steps=None if commit is None else commit.steps,
        sample_rate=entry.sample_rate,
        noise_multiplier=entry.noise_multiplier,
        max_grad_norm=entry.max_grad_norm,
        timestamp=entry.timestamp,
    )
