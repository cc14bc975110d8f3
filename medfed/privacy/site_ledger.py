"""The site's side of the ledger: reserve privacy before training, commit after.

Every write happens under an exclusive lock on ``<ledger>.lock`` and starts by verifying the
whole ledger, so that nothing is ever appended to a damaged ledger and two processes of one
site cannot both reserve the last of the budget.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError, PrivacyError
from medfed.privacy.accounting import (
    AccountantName,
    AdaptiveClippingNoise,
    DPSteps,
    adaptive_clipping_noise,
    check_steps,
    compute_epsilon,
)
from medfed.privacy.budget import (
    BudgetCheck,
    BudgetStatus,
    PrivacyTerms,
    budget_status,
    check_budget,
)
from medfed.privacy.distributed_noise import RDP_ACCOUNTANTS, BudgetView, DistributedPlan
from medfed.privacy.events import (
    GENESIS_HASH,
    LEDGER_VERSION,
    PRIVACY_UNIT,
    Mechanism,
    canonical_json,
    line_hash,
    sign,
)
from medfed.privacy.keys import key_id, load_or_create_signing_key, load_public_key, public_key_path
from medfed.privacy.ledger import LedgerReport, verify_ledger, verify_ledger_bytes
from medfed.privacy.ledger_head import head_path, signed_head
from medfed.privacy.receipt import LedgerReceipt, ReceiptStore, check_receipt, read_receipt
from medfed.privacy.witness import HeadWitness
from medfed.storage import append_line, locked, read_bytes, replace_file

_PACKAGES = ("medfed", "torch", "opacus", "dp-accounting")

log = logging.getLogger("medfed.privacy")


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPlan:
    """The DP-SGD training a site intends to run for one round of a run."""

    run_id: str
    round: int
    planned_rounds: int | None  # None for a site's own training outside a federation run
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float  # with adaptive clipping, the clip the round starts from
    # With adaptive clipping: the clip count's noise multiplier (sensitivity 1/2); the steps
    # still spend ``noise_multiplier``, split between the sum and the count. None: fixed clip.
    count_noise_multiplier: float | None = None
    # A distributed discrete Gaussian step (one full-batch step); ``noise_multiplier`` is then
    # the Gaussian equivalent of the guarantee the plan's budget names.
    distributed: DistributedPlan | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not 0 < len(self.run_id) <= 256:
            raise PrivacyError(f"run id must be 1 to 256 characters, got {self.run_id!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise PrivacyError(f"round must be an integer >= 0, got {self.round!r}")
        planned = self.planned_rounds
        if planned is not None and (
            isinstance(planned, bool) or not isinstance(planned, int) or planned < 1
        ):
            raise PrivacyError(f"planned_rounds must be an integer >= 1, got {planned!r}")
        check_steps(self.steps)
        if self.steps == 0:
            raise PrivacyError("a round plan needs at least one step", hint="check epochs")
        DPSteps(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )
        if (
            isinstance(self.max_grad_norm, bool)
            or not isinstance(self.max_grad_norm, int | float)
            or not 0.0 < self.max_grad_norm < math.inf
        ):
            raise PrivacyError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if self.count_noise_multiplier is not None:
            adaptive_clipping_noise(  # refuses a count noise that leaves the sum none
                noise_multiplier=self.noise_multiplier,
                count_noise_multiplier=self.count_noise_multiplier,
            )
        if self.distributed is not None:
            self._check_distributed(self.distributed)

    def _check_distributed(self, plan: DistributedPlan) -> None:
        """A distributed-noise round is one full-batch step charged at the plan's multiplier."""
        if not isinstance(plan, DistributedPlan):
            raise PrivacyError(
                f"distributed must be a DistributedPlan, got {type(plan).__name__}",
                hint="build it with medfed.privacy.distributed_noise.DistributedPlan",
            )
        if self.sample_rate != 1.0 or self.steps != 1:
            raise PrivacyError(
                f"a distributed-noise round takes one full-batch step, got sample rate "
                f"{self.sample_rate!r} and {self.steps} steps",
                hint="plan sample_rate=1.0 and steps=1 with distributed noise",
            )
        if self.count_noise_multiplier is not None:
            raise PrivacyError(
                "a distributed-noise round has no adaptive clipping count noise",
                hint="leave count_noise_multiplier unset; the plan's count_weight adds the count",
            )
        enforced = plan.enforced_noise_multiplier
        if self.noise_multiplier != enforced:
            raise PrivacyError(
                f"noise multiplier {self.noise_multiplier!r} is not the {plan.budget} "
                f"guarantee's Gaussian equivalent {enforced!r}",
                hint="set noise_multiplier to the plan's enforced_noise_multiplier",
            )

    @property
    def adaptive_noise(self) -> AdaptiveClippingNoise:
        """How the steps split their noise between the clipped sum and the clip count."""
        if self.count_noise_multiplier is None:
            raise PrivacyError("this round plan has a fixed clip: no count is released")
        return adaptive_clipping_noise(
            noise_multiplier=self.noise_multiplier,
            count_noise_multiplier=self.count_noise_multiplier,
        )

    @property
    def dp_steps(self) -> DPSteps:
        """The plan as accountant input."""
        return DPSteps(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """Numbers about to leave the site, and the mechanism that covers them (see ReleaseEntry)."""

    run_id: str
    round: int
    quantity: str
    values: Mapping[str, float]
    mechanism: Mechanism
    noise_multiplier: float | None = None
    sensitivity: float | None = None
    noise_std: float | None = None
    reservation_seq: int | None = None
    model_sha256: str | None = None
    reason: str | None = None
    # the commitment to values that stay at the site (medfed.privacy.sealed); values empty
    sealed: str | None = None

    @property
    def dp_steps(self) -> DPSteps | None:
        """What the accountant charges for it: nothing unless it is a Gaussian mechanism."""
        if self.mechanism != "gaussian":
            return None
        if self.noise_multiplier is None:
            raise PrivacyError("a Gaussian release needs a noise multiplier")
        return DPSteps(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A recorded reservation: the round's plan, under the terms it was checked against, at
    ledger entry ``seq``. Commit it with the steps actually taken."""

    seq: int
    plan: RoundPlan
    epsilon_before: float
    epsilon_after: float
    terms: PrivacyTerms


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    versions = []
    for name in _PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return tuple(versions)


def library_versions() -> Mapping[str, str]:
    """Versions of the packages that determine an epsilon, read without importing them."""
    return dict(_library_versions())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class SiteLedger:
    """One site's ledger file, its head, its lock and its signing key."""

    def __init__(
        self,
        *,
        path: Path,
        key_path: Path,
        site_id: str,
        witness: Path | None = None,
        receipt_key: Ed25519PublicKey | None = None,
    ) -> None:
        if not isinstance(site_id, str) or not 0 < len(site_id) <= 256:
            raise PrivacyError(f"site id must be 1 to 256 characters, got {site_id!r}")
        self.path = Path(path)
        self.key_path = Path(key_path)
        self.site_id = site_id
        self.witness = None if witness is None else HeadWitness(directory=witness, site_id=site_id)
        self.receipts = (
            None
            if receipt_key is None
            else ReceiptStore(ledger_path=self.path, site_id=site_id, public_key=receipt_key)
        )
        self._key: Ed25519PrivateKey | None = None

    def verify(self) -> LedgerReport:
        """Verify the ledger (under a shared lock); an absent ledger is empty and valid."""
        if not self.path.exists() and not head_path(self.path).exists():
            known = self._existing_public_key()
            if self.witness is not None and known is not None:
                # a whole ledger directory gone (or restored empty) is a rollback too
                self.witness.check(ledger_path=self.path, entries=0, public_key=known)
            empty = LedgerReport(
                path=self.path,
                site_id=self.site_id,
                key_id=None if known is None else key_id(known),
                entries=(),
                reservations=(),
                releases=(),
                terms_changes=(),
                last_hash=GENESIS_HASH,
            )
            self._check_stored_receipt(empty)
            return empty
        public_key = self._existing_public_key()
        if public_key is None:
            raise self._missing_key()
        with locked(self.path, exclusive=False):
            return self._verify_now(public_key)

    def history(self) -> list[DPSteps]:
        """The verified ledger's DP-SGD history (uncommitted reservations in full)."""
        return list(self.verify().history)

    def spent(
        self,
        *,
        delta: float | None = None,
        accountant: AccountantName | None = None,
        view: BudgetView | None = None,
    ) -> float:
        """Epsilon spent so far, recomputed from the verified ledger at its own terms.

        ``delta`` and ``accountant`` default to the ledger's terms (RDP at the strictest delta
        of a format-1 ledger that has no terms yet). ``view`` None: what the budget is
        enforced on; ``"distributed"`` or ``"local"``: every distributed-noise reservation
        charged at that guarantee (:meth:`LedgerReport.history_of`).
        """
        report = self.verify()
        terms = report.terms
        delta = delta if delta is not None else terms.delta if terms else report.legacy_delta
        if delta is None:
            return 0.0
        accountant = accountant or (terms.accountant if terms else "rdp")
        history = report.history if view is None else report.history_of(view)
        return compute_epsilon(history=history, delta=delta, accountant=accountant)

    def status(self, *, terms: PrivacyTerms) -> BudgetStatus:
        """Spent and remaining epsilon under ``terms``."""
        return budget_status(history=self.history(), cap=terms.cap, accountant=terms.accountant)

    def reserve(self, *, plan: RoundPlan, terms: PrivacyTerms) -> Reservation:
        """Record ``plan`` before training, or raise BudgetExceededError and write nothing.

        ``terms`` (the site's configured accountant, delta and cap) are written first when
        they differ from the ledger's; the budget check uses them and runs in the same
        critical section as the appends.
        """
        fields: dict[str, Any] = {
            "run_id": plan.run_id,
            "round": plan.round,
            "planned_rounds": plan.planned_rounds,
            "steps": plan.steps,
            "sample_rate": float(plan.sample_rate),
            "noise_multiplier": float(plan.noise_multiplier),
            "max_grad_norm": float(plan.max_grad_norm),
            "library_versions": library_versions(),
        }
        if plan.count_noise_multiplier is not None:
            # Written only with adaptive clipping, so that other entries stay as they were.
            fields["count_noise_multiplier"] = float(plan.count_noise_multiplier)
        if plan.distributed is not None:
            # Likewise only with distributed noise.
            _check_rdp_terms(terms)
            fields["distributed"] = plan.distributed.to_json()
        seq, check = self._write(kind="reserve", cost=plan.dp_steps, terms=terms, fields=fields)
        assert check is not None
        return Reservation(
            seq=seq,
            plan=plan,
            epsilon_before=check.spent,
            epsilon_after=check.would_reach,
            terms=terms,
        )

    def release(self, *, release: Release, terms: PrivacyTerms) -> int:
        """Record a release before it leaves the site; its seq. A Gaussian one is budgeted.

        A release the cap cannot pay for raises BudgetExceededError and writes nothing.
        """
        seq, _ = self._write(
            kind="release",
            cost=release.dp_steps,
            terms=terms,
            fields={
                "run_id": release.run_id,
                "round": release.round,
                "quantity": release.quantity,
                "values": {key: float(value) for key, value in release.values.items()},
                "mechanism": release.mechanism,
                "unit": PRIVACY_UNIT,
                "noise_multiplier": _float_or_none(release.noise_multiplier),
                "sensitivity": _float_or_none(release.sensitivity),
                "noise_std": _float_or_none(release.noise_std),
                "reservation_seq": release.reservation_seq,
                "model_sha256": release.model_sha256,
                "reason": release.reason,
                **({} if release.sealed is None else {"sealed": release.sealed}),
            },
        )
        return seq

    def _write(
        self, *, kind: str, cost: DPSteps | None, terms: PrivacyTerms, fields: dict[str, Any]
    ) -> tuple[int, BudgetCheck | None]:
        """Check the budget for ``cost``, adopt ``terms``, append one entry: under one lock."""
        private_key = self._signing_key()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path, exclusive=True):
            report = self._verify_now(private_key.public_key())
            check = None
            if cost is not None:
                check = check_budget(
                    history=report.history, planned=cost, cap=terms.cap, accountant=terms.accountant
                )
            report = self._adopt_terms(report, private_key, terms)
            seq = len(report.entries)
            self._append(report, private_key, {**self._header(report, private_key, kind), **fields})
        return seq, check

    def commit(
        self,
        reservation: Reservation,
        *,
        steps: int,
        model_sha256: str | None = None,
        update_sha256: str | None = None,
    ) -> None:
        """Record the steps a reserved round actually took (at most the reserved steps).

        Training must stop at the reserved steps: a larger count is refused, and the
        reservation then keeps counting in full. ``model_sha256`` and ``update_sha256`` (the
        :func:`medfed.types.weights_digest` of the model trained from and of the update sent)
        bind the entry to the weights; each is written only when given.
        """
        check_steps(steps)
        digests = {
            name: value
            for name, value in (("model_sha256", model_sha256), ("update_sha256", update_sha256))
            if value is not None
        }
        for name, value in digests.items():
            if not (len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
                raise LedgerError(
                    f"{self.path}: {name} {value!r} is not a SHA-256 hex digest",
                    hint="pass medfed.types.weights_digest(...) of the weights",
                )
        private_key = self._signing_key()
        with locked(self.path, exclusive=True):
            report = self._verify_now(private_key.public_key())
            state = next((r for r in report.reservations if r.seq == reservation.seq), None)
            wanted = (reservation.seq, reservation.plan.run_id, reservation.plan.round)
            if state is None or (state.seq, state.run_id, state.round) != wanted:
                raise LedgerError(
                    f"{self.path}: no reservation seq {reservation.seq} for run "
                    f"{reservation.plan.run_id!r} round {reservation.plan.round}",
                    hint="commit the Reservation returned by reserve() on this same ledger",
                )
            if state.committed:
                raise LedgerError(
                    f"{self.path}: reservation seq {state.seq} is already committed",
                    hint="commit each reservation once",
                )
            if steps > state.reserved_steps:
                raise LedgerError(
                    f"{self.path}: cannot commit {steps} steps for reservation seq {state.seq}, "
                    f"which reserved {state.reserved_steps}",
                    hint="stop training at the reserved steps; reserve again before training more",
                )
            self._append(
                report,
                private_key,
                {
                    **self._header(report, private_key, "commit"),
                    "reservation_seq": state.seq,
                    "steps": steps,
                    **digests,
                },
            )

    def _adopt_terms(
        self, report: LedgerReport, private_key: Ed25519PrivateKey, terms: PrivacyTerms
    ) -> LedgerReport:
        """Append a terms entry when ``terms`` differ from the ledger's; the report after it.

        A larger delta than the ledger's is refused: it would lower the epsilon reported for
        steps already taken. A raised cap is the site's governance decision and is recorded
        (the aggregator and the audit flag it).
        """
        current = report.terms
        if current == terms:
            return report
        if report.has_distributed:
            _check_rdp_terms(terms)
        floor = current.delta if current is not None else report.legacy_delta
        if floor is not None and terms.delta > floor:
            raise LedgerError(
                f"{self.path}: privacy.delta {terms.delta:g} is larger than the delta "
                f"{floor:g} this ledger is kept under; a larger delta would report less "
                "epsilon for the steps already taken",
                hint=f"set privacy.delta back to {floor:g} (or lower)",
            )
        if current is not None and terms.epsilon_cap > current.epsilon_cap:
            log.warning(
                "site %s raises its epsilon cap from %g to %g; the change is recorded in its "
                "ledger and shown to the aggregator and auditors",
                self.site_id,
                current.epsilon_cap,
                terms.epsilon_cap,
            )
        self._append(
            report,
            private_key,
            {
                **self._header(report, private_key, "terms"),
                "accountant": terms.accountant,
                "delta": float(terms.delta),
                "epsilon_cap": float(terms.epsilon_cap),
            },
        )
        return self._verify_now(private_key.public_key())

    def _header(
        self, report: LedgerReport, private_key: Ed25519PrivateKey, kind: str
    ) -> dict[str, Any]:
        return {
            "v": LEDGER_VERSION,
            "kind": kind,
            "seq": len(report.entries),
            "prev_hash": report.last_hash,
            "timestamp": _now(),
            "site_id": self.site_id,
            "key_id": key_id(private_key.public_key()),
        }

    def _append(
        self, report: LedgerReport, private_key: Ed25519PrivateKey, entry: dict[str, Any]
    ) -> None:
        line = canonical_json(sign(entry, private_key))
        # Never write what the verifier would refuse to read: the ledger with the new line,
        # checked in memory by the same rules (fields, chain, commits, releases).
        try:
            verify_ledger_bytes(
                read_bytes(self.path) + line + b"\n",
                public_key=private_key.public_key(),
                site_id=self.site_id,
                source=str(self.path),
            )
        except LedgerError as exc:
            raise LedgerError(
                f"refusing to append a {entry.get('kind')} entry: {exc.message}",
                hint="this is a bug in the caller; the ledger was not changed",
            ) from None
        append_line(self.path, line)
        head = signed_head(
            site_id=self.site_id,
            count=len(report.entries) + 1,
            last_hash=line_hash(line),
            private_key=private_key,
        )
        replace_file(head_path(self.path), head)
        if self.witness is not None:
            self.witness.record(head)

    def record_witness(self) -> LedgerReport:
        """Copy the verified ledger's head to the witness (a new or replaced witness location)."""
        if self.witness is None:
            raise LedgerError(
                f"{self.path}: no head witness is configured",
                hint="set paths.head_witness in the site config to a directory on another volume",
            )
        with locked(self.path, exclusive=True):
            public_key = self._signing_key().public_key()
            report = verify_ledger(self.path, public_key=public_key, site_id=self.site_id)
            self.witness.record(read_bytes(head_path(self.path)))
        return report

    def accept_receipt(self, text: str) -> LedgerReceipt:
        """Check the aggregator's receipt ``text`` against the ledger, and keep it.

        A ledger holding fewer entries than the aggregator accepted, or other ones, is
        refused (LedgerError) before anything is reserved.
        """
        if self.receipts is None:
            raise LedgerError(
                f"site {self.site_id} has no receipt key to check the aggregator's receipt with",
                hint="set transport.receipt_public_key to the aggregator_receipt.pub of the kit",
            )
        receipt = read_receipt(text, public_key=self.receipts.public_key, site_id=self.site_id)
        check_receipt(self.verify(), receipt, where="the aggregator's receipt")
        kept = self.receipts.keep(receipt)
        if kept is not receipt:
            log.warning(
                "site %s: the aggregator's receipt covers %d entries, fewer than the %d of the "
                "receipt kept at %s; the aggregator's copy of this ledger is behind",
                self.site_id,
                receipt.count,
                kept.count,
                self.receipts.path,
            )
        return receipt

    def _check_stored_receipt(self, report: LedgerReport) -> None:
        if self.receipts is None:
            return
        stored = self.receipts.load()
        if stored is not None:
            check_receipt(report, stored, where=f"receipt {self.receipts.path}")

    def _verify_now(self, public_key: Ed25519PublicKey) -> LedgerReport:
        report = verify_ledger(self.path, public_key=public_key, site_id=self.site_id)
        if self.witness is not None:
            self.witness.check(
                ledger_path=self.path, entries=len(report.entries), public_key=public_key
            )
        self._check_stored_receipt(report)
        return report

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            if not self.key_path.exists() and (self.path.exists() or head_path(self.path).exists()):
                # A fresh key could never verify the entries already written.
                raise self._missing_key()
            self._key = load_or_create_signing_key(self.key_path)
        return self._key

    def _missing_key(self) -> LedgerError:
        return LedgerError(
            f"{self.path}: the ledger exists but its signing key {self.key_path} does not",
            hint="restore the site's key directory from backup; a new key cannot continue "
            "an existing ledger",
        )

    def _existing_public_key(self) -> Ed25519PublicKey | None:
        if self.key_path.exists():
            return self._signing_key().public_key()
        if public_key_path(self.key_path).exists():
            return load_public_key(public_key_path(self.key_path))
        return None


def _check_rdp_terms(terms: PrivacyTerms) -> None:
    """Distributed-noise steps are charged at Gaussian equivalents that bound RDP only."""
    if terms.accountant not in RDP_ACCOUNTANTS:
        raise PrivacyError(
            f"the {terms.accountant} accountant cannot charge distributed-noise steps: their "
            "Gaussian equivalent bounds the step's RDP, not its privacy loss distribution",
            hint=f"set privacy.accountant to one of {', '.join(RDP_ACCOUNTANTS)} for a site "
            "that uses distributed noise",
        )


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)
