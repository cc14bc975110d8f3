"""Share distribution: each site splits its secrets among the epoch's sites, encrypted for each.

A site splits its mask private key and each of its per-round self-mask seeds into Shamir shares,
one per site of the roster (itself included: it keeps its own share in the clear), and encrypts
every other site's shares with ChaCha20-Poly1305 under a key both agree with their share X25519
keys. The aggregator only routes the ciphertexts; the sender, the recipient, the run and the
epoch are authenticated with each one, so a ciphertext cannot be replayed to another site or
into another epoch.

The sites whose shares a site received (and itself) are its epoch's *members*: it masks with
exactly them. An honest aggregator forwards every site the shares of the same senders, so all
members agree on who they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from medfed.errors import SecureAggregationError
from medfed.secagg import shamir
from medfed.secagg.derive import SYSTEM_RANDOM, RandomBytes, context_bytes, derive_key
from medfed.secagg.keys import KeyRoster, SiteSecrets

_NONCE_BYTES: Final = 12
_NEW_EPOCH = "start a new key epoch: the shares of this one cannot be trusted"


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedShare:
    """One site's shares for one other site, encrypted for it; the aggregator routes it."""

    sender: str
    recipient: str
    run_id: str
    epoch: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerShares:
    """What ``holder`` holds of ``owner``'s secrets: shares at the holder's point ``x``."""

    owner: str
    holder: str
    x: int
    mask_key: int = field(repr=False)
    self_seeds: Mapping[int, int] = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareDistribution:
    """A site's own share of its secrets (kept) and its ciphertexts for the others (sent)."""

    own: PeerShares
    outgoing: tuple[EncryptedShare, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldShares:
    """Everything one site holds after distribution: the epoch's members and their shares."""

    holder: str
    run_id: str
    epoch: int
    rounds: tuple[int, ...]
    threshold: int
    members: tuple[str, ...]
    shares: Mapping[str, PeerShares] = field(repr=False)


def distribute_shares(
    *, secrets: SiteSecrets, roster: KeyRoster, random_bytes: RandomBytes = SYSTEM_RANDOM
) -> ShareDistribution:
    """Split the site's mask key and self-mask seeds among the roster, one ciphertext per peer."""
    _check_epoch(secrets, roster)
    points = {site: roster.point_of(site) for site in roster.sites}
    xs = list(points.values())
    mask_shares = shamir.split(
        secrets.mask_key_bytes(), threshold=roster.threshold, xs=xs, random_bytes=random_bytes
    )
    seed_shares = {
        round_id: shamir.split(seed, threshold=roster.threshold, xs=xs, random_bytes=random_bytes)
        for round_id, seed in secrets.self_seeds.items()
    }
    own: PeerShares | None = None
    outgoing: list[EncryptedShare] = []
    for site, x in points.items():
        shares = PeerShares(
            owner=secrets.site_id,
            holder=site,
            x=x,
            mask_key=mask_shares[x],
            self_seeds=MappingProxyType({r: by_x[x] for r, by_x in seed_shares.items()}),
        )
        if site == secrets.site_id:
            own = shares
        else:
            outgoing.append(
                _encrypt(shares, secrets=secrets, roster=roster, random_bytes=random_bytes)
            )
    if own is None:
        raise SecureAggregationError(
            f"{secrets.site_id} is not in the roster of key epoch {roster.epoch}",
            hint="a site whose key bundle was excluded sits this key epoch out",
        )
    return ShareDistribution(own=own, outgoing=tuple(outgoing))


def open_shares(
    *,
    secrets: SiteSecrets,
    roster: KeyRoster,
    own: PeerShares,
    incoming: Sequence[EncryptedShare],
) -> HeldShares:
    """Decrypt the shares the aggregator forwarded; their senders and the site are the members.

    Raises:
        SecureAggregationError: A ciphertext is not for this site and epoch, does not decrypt
            (damaged, or not from its claimed sender), holds shares of the wrong shape, a sender
            sent twice, or fewer members than the threshold remain.
    """
    _check_epoch(secrets, roster)
    shares: dict[str, PeerShares] = {secrets.site_id: own}
    for item in incoming:
        if item.sender in shares:
            raise SecureAggregationError(
                f"{secrets.site_id}: shares from {item.sender} arrived twice in key epoch "
                f"{roster.epoch}",
                hint=_NEW_EPOCH,
            )
        shares[item.sender] = _decrypt(item, secrets=secrets, roster=roster)
    members = tuple(sorted(shares))
    if len(members) < roster.threshold:
        raise SecureAggregationError(
            f"{secrets.site_id}: shares from {len(members)} site(s) (itself included) in key "
            f"epoch {roster.epoch}, {roster.threshold} needed",
            hint="start the key epoch again once more sites are online",
        )
    return HeldShares(
        holder=secrets.site_id,
        run_id=roster.run_id,
        epoch=roster.epoch,
        rounds=secrets.rounds,
        threshold=roster.threshold,
        members=members,
        shares=MappingProxyType(shares),
    )


def _check_epoch(secrets: SiteSecrets, roster: KeyRoster) -> None:
    if (secrets.run_id, secrets.epoch) != (roster.run_id, roster.epoch):
        raise SecureAggregationError(
            f"{secrets.site_id}: keys of run {secrets.run_id} epoch {secrets.epoch} used with the "
            f"roster of run {roster.run_id} epoch {roster.epoch}",
            hint="use the keys made for the roster's run and key epoch",
        )


def _box(secrets: SiteSecrets, roster: KeyRoster, peer: str) -> ChaCha20Poly1305:
    own_public = roster.bundle_of(secrets.site_id).share_public
    peer_public = roster.bundle_of(peer).share_public
    shared = secrets.share_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    (low, low_key), (high, high_key) = sorted([(secrets.site_id, own_public), (peer, peer_public)])
    key = derive_key(
        shared,
        purpose="share encryption",
        run_id=roster.run_id,
        epoch=roster.epoch,
        low_site=low,
        high_site=high,
        low_public=low_key,
        high_public=high_key,
    )
    return ChaCha20Poly1305(key)


def _associated(*, sender: str, recipient: str, run_id: str, epoch: int) -> bytes:
    return context_bytes(
        "encrypted shares", sender=sender, recipient=recipient, run_id=run_id, epoch=epoch
    )


def _encrypt(
    shares: PeerShares, *, secrets: SiteSecrets, roster: KeyRoster, random_bytes: RandomBytes
) -> EncryptedShare:
    plain = {
        "owner": shares.owner,
        "holder": shares.holder,
        "x": shares.x,
        "mask_key": format(shares.mask_key, "x"),
        "self_seeds": {str(r): format(v, "x") for r, v in shares.self_seeds.items()},
    }
    nonce = random_bytes(_NONCE_BYTES)
    associated = _associated(
        sender=shares.owner, recipient=shares.holder, run_id=roster.run_id, epoch=roster.epoch
    )
    ciphertext = _box(secrets, roster, shares.holder).encrypt(
        nonce, json.dumps(plain, sort_keys=True).encode("ascii"), associated
    )
    return EncryptedShare(
        sender=shares.owner,
        recipient=shares.holder,
        run_id=roster.run_id,
        epoch=roster.epoch,
        nonce=nonce,
        ciphertext=ciphertext,
    )


def _decrypt(item: EncryptedShare, *, secrets: SiteSecrets, roster: KeyRoster) -> PeerShares:
    where = f"{secrets.site_id}: shares from {item.sender} in key epoch {roster.epoch}"
    if item.recipient != secrets.site_id or (item.run_id, item.epoch) != (
        roster.run_id,
        roster.epoch,
    ):
        raise SecureAggregationError(
            f"{where} are addressed to {item.recipient} in run {item.run_id} epoch {item.epoch}",
            hint=_NEW_EPOCH,
        )
    if item.sender not in roster.sites or item.sender == secrets.site_id:
        raise SecureAggregationError(
            f"{where}: the sender is not a peer in the roster", hint=_NEW_EPOCH
        )
    associated = _associated(
        sender=item.sender, recipient=item.recipient, run_id=item.run_id, epoch=item.epoch
    )
    try:
        plain = _box(secrets, roster, item.sender).decrypt(item.nonce, item.ciphertext, associated)
    except (InvalidTag, ValueError):
        raise SecureAggregationError(f"{where} do not decrypt", hint=_NEW_EPOCH) from None
    try:
        shares = _parse(json.loads(plain))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SecureAggregationError(f"{where} are not readable shares", hint=_NEW_EPOCH) from None
    expected = (item.sender, secrets.site_id, roster.point_of(secrets.site_id), set(secrets.rounds))
    if (shares.owner, shares.holder, shares.x, set(shares.self_seeds)) != expected:
        raise SecureAggregationError(
            f"{where} are for another owner, holder, point or set of rounds", hint=_NEW_EPOCH
        )
    return shares


def _parse(plain: Any) -> PeerShares:
    return PeerShares(
        owner=str(plain["owner"]),
        holder=str(plain["holder"]),
        x=int(plain["x"]),
        mask_key=int(plain["mask_key"], 16),
        self_seeds=MappingProxyType(
            {int(r): int(v, 16) for r, v in dict(plain["self_seeds"]).items()}
        ),
    )
