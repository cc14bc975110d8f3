"""Key epochs: each site's X25519 keys, advertised signed with its ledger key, and the roster.

A site makes two X25519 key pairs per key epoch (one to agree pairwise masks, one to encrypt the
Shamir shares it sends), plus one random self-mask seed per round of the epoch. Its public keys
travel in a :class:`KeyBundle` signed with the site's Ed25519 ledger key, so that a site can
check that the keys it masks with belong to the sites it knows, not to the aggregator that
routes them. :func:`verify_bundles` keeps the bundles that verify and names every site it leaves
out, with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from medfed.errors import ConfigError, SecureAggregationError
from medfed.secagg.derive import KEY_BYTES, SYSTEM_RANDOM, RandomBytes, random_key

_BUNDLE_PURPOSE: Final = "medfed secure aggregation key bundle"
_BUNDLE_VERSION: Final = 1
MIN_SITES: Final = 2


def threshold_for(sites: int) -> int:
    """Shares needed to recover a secret in an epoch of ``sites`` sites: a majority, at least 2.

    A majority means no minority of sites can together recover a site's secrets; at least two
    means the aggregator never unmasks fewer than two sites' inputs.
    """
    return max(MIN_SITES, sites // 2 + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteSecrets:
    """One site's private keys and self-mask seeds for one key epoch; they never leave the site."""

    site_id: str
    run_id: str
    epoch: int
    rounds: tuple[int, ...]
    mask_key: X25519PrivateKey = field(repr=False)
    share_key: X25519PrivateKey = field(repr=False)
    self_seeds: Mapping[int, bytes] = field(repr=False)

    def mask_key_bytes(self) -> bytes:
        """The raw mask private key: the secret the site shares for dropout recovery."""
        return self.mask_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyBundle:
    """A site's public keys for one key epoch, signed with its Ed25519 ledger key."""

    site_id: str
    run_id: str
    epoch: int
    mask_public: bytes
    share_public: bytes
    signature: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRoster:
    """The sites of one key epoch whose bundles verified, and those left out with the reason.

    ``bundles`` are sorted by site id; a site's 1-based place in that order is the point its
    Shamir shares sit at. ``threshold`` is :func:`threshold_for` the number of sites kept.
    """

    run_id: str
    epoch: int
    bundles: tuple[KeyBundle, ...]
    excluded: Mapping[str, str]
    threshold: int

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(bundle.site_id for bundle in self.bundles)

    def bundle_of(self, site_id: str) -> KeyBundle:
        for bundle in self.bundles:
            if bundle.site_id == site_id:
                return bundle
        raise SecureAggregationError(
            f"{site_id} is not in key epoch {self.epoch} of run {self.run_id}",
            hint="only sites whose key bundles verified take part in the epoch",
        )

    def point_of(self, site_id: str) -> int:
        """The x coordinate of the Shamir shares ``site_id`` holds."""
        return self.sites.index(self.bundle_of(site_id).site_id) + 1


def new_site_secrets(
    *,
    site_id: str,
    run_id: str,
    epoch: int,
    rounds: Sequence[int],
    random_bytes: RandomBytes = SYSTEM_RANDOM,
) -> SiteSecrets:
    """Fresh keys and self-mask seeds for the rounds ``rounds`` of key epoch ``epoch``.

    Raises:
        ConfigError: No rounds, or a round listed twice.
    """
    if not rounds or len(set(rounds)) != len(rounds):
        raise ConfigError(
            f"key epoch {epoch} of run {run_id}: rounds {list(rounds)} must be distinct and not "
            "empty",
            hint="give each key epoch the round numbers it covers, each once",
        )
    return SiteSecrets(
        site_id=site_id,
        run_id=run_id,
        epoch=epoch,
        rounds=tuple(rounds),
        mask_key=X25519PrivateKey.from_private_bytes(random_key(random_bytes)),
        share_key=X25519PrivateKey.from_private_bytes(random_key(random_bytes)),
        self_seeds=MappingProxyType({r: random_key(random_bytes) for r in rounds}),
    )


def advertise(*, secrets: SiteSecrets, ledger_key: Ed25519PrivateKey) -> KeyBundle:
    """The site's signed public key bundle for its epoch."""
    unsigned = KeyBundle(
        site_id=secrets.site_id,
        run_id=secrets.run_id,
        epoch=secrets.epoch,
        mask_public=_raw_public(secrets.mask_key.public_key()),
        share_public=_raw_public(secrets.share_key.public_key()),
        signature=None,
    )
    return replace(unsigned, signature=ledger_key.sign(signed_message(unsigned)))


def signed_message(bundle: KeyBundle) -> bytes:
    """The bytes a bundle's signature covers: canonical JSON of everything but the signature."""
    document = {
        "purpose": _BUNDLE_PURPOSE,
        "version": _BUNDLE_VERSION,
        "site_id": bundle.site_id,
        "run_id": bundle.run_id,
        "epoch": bundle.epoch,
        "mask_public": bundle.mask_public.hex(),
        "share_public": bundle.share_public.hex(),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def verify_bundles(
    *,
    bundles: Iterable[KeyBundle],
    ledger_keys: Mapping[str, Ed25519PublicKey],
    run_id: str,
    epoch: int,
) -> KeyRoster:
    """The roster of the bundles that verify; every other site named in ``excluded``, with why.

    ``ledger_keys`` are the public ledger keys of the sites the checking party knows (from the
    sites' enrolment, not from the aggregator). A known site that sent no bundle is excluded too.

    Raises:
        SecureAggregationError: Fewer than two bundles verify: no epoch can start.
    """
    received: dict[str, list[KeyBundle]] = {}
    for bundle in bundles:
        received.setdefault(bundle.site_id, []).append(bundle)
    excluded: dict[str, str] = {}
    accepted: list[KeyBundle] = []
    for site_id in sorted(set(received) | set(ledger_keys)):
        copies = received.get(site_id, [])
        reason = _problem(copies, ledger_keys.get(site_id), run_id=run_id, epoch=epoch)
        if reason is None:
            accepted.append(copies[0])
        else:
            excluded[site_id] = reason
    if len(accepted) < MIN_SITES:
        named = "; ".join(f"{site}: {why}" for site, why in excluded.items()) or "none received"
        raise SecureAggregationError(
            f"key epoch {epoch} of run {run_id}: {len(accepted)} key bundle(s) verified, "
            f"{MIN_SITES} needed ({named})",
            hint="check that the sites sign with the ledger keys the others were given",
        )
    return KeyRoster(
        run_id=run_id,
        epoch=epoch,
        bundles=tuple(accepted),
        excluded=MappingProxyType(excluded),
        threshold=threshold_for(len(accepted)),
    )


def _problem(
    copies: Sequence[KeyBundle], ledger_key: Ed25519PublicKey | None, *, run_id: str, epoch: int
) -> str | None:
    """Why a site's bundle is left out, or None when it is kept."""
    if not copies:
        return "sent no key bundle"
    if len(copies) > 1:
        return f"sent {len(copies)} key bundles for one epoch"
    bundle = copies[0]
    if ledger_key is None:
        return "no ledger key is known for this site"
    if not bundle.signature:
        return "the key bundle has no signature"
    try:
        ledger_key.verify(bundle.signature, signed_message(bundle))
    except InvalidSignature:
        return "the key bundle's signature does not verify under the site's ledger key"
    if bundle.run_id != run_id or bundle.epoch != epoch:
        return f"the key bundle is for run {bundle.run_id} epoch {bundle.epoch}"
    for name, raw in (("mask", bundle.mask_public), ("share", bundle.share_public)):
        if not _usable_public_key(raw):
            return f"the {name} public key is not a usable X25519 key"
    if bundle.mask_public == bundle.share_public:
        return "the mask and share public keys are the same key"
    return None


def _usable_public_key(raw: bytes) -> bool:
    # A low-order point makes every agreement with it the all-zero secret, which anyone knows;
    # cryptography refuses that agreement, so one trial exchange finds such keys.
    if len(raw) != KEY_BYTES:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
