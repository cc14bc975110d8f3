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
A line is read back, every field checked, by :mod:`medfed.privacy.entry_format`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError

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
    "secure aggregation keys": "X25519 public keys signed with the ledger key, Shamir shares "
    "encrypted for the other sites, and the shares and round keys that remove masks from a sum: "
    "random numbers from the operating system, independent of any patient",
    "masked update": "the change of the DP-SGD weights, the released training count and the "
    "round's DP-SGD loss (each covered above or by the round's reservation), the final model's "
    "released Dice and validation count (sealed releases), or with distributed "
    "noise the site's integer sum of clipped per-patient gradients and its patient count under "
    "its discrete Gaussian share (covered by the round's reservation, with both guarantees), "
    "under masks that cancel only in a sum over at least the threshold of sites",
}


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
    # Adaptive clipping's noise on the clipped count (``2 sigma_b``); ``noise_multiplier``
    # stays what the accountant charges for the pair (medfed.privacy.accounting).
    count_noise_multiplier: float | None = None
    # A distributed discrete Gaussian step: the parameters and both Gaussian equivalents
    # (medfed.privacy.distributed_noise.DistributedPlan.to_json); ``noise_multiplier`` is
    # the one of the two the site's budget is enforced on.
    distributed: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitEntry:
    """The steps a reserved round actually took, recorded after training.

    In a federated round, ``model_sha256`` is the :func:`medfed.types.weights_digest` of the
    global model training started from and ``update_sha256`` that of the weights the site
    sent back, so that a model can be traced to the ledger entries that paid for it. Both are
    None in entries written before they existed and where there is no such model.
    """

    seq: int
    prev_hash: str
    timestamp: str
    site_id: str
    key_id: str
    signature: str
    reservation_seq: int
    steps: int
    model_sha256: str | None = None
    update_sha256: str | None = None


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
    ``sealed``: a Gaussian release whose values stayed at the site (under secure aggregation they
    cross only inside a masked sum); ``values`` is then empty and ``sealed`` is the commitment
    to them (:mod:`medfed.privacy.sealed`). Its cost is the same as if they had been shown.
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
    sealed: str | None = None


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
        raise LedgerError(
            "the object to sign already has a signature: a ledger line is signed once",
            hint="sign the object without its signature field",
        )
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
