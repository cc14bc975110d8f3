"""The protocol's values as plain JSON objects, and back, for messages and the site's state file.

Bytes travel as hex, share values (integers below the Shamir prime) as hex strings, so that
JSON numbers never have to hold more than a round number. Every reader checks what it gets and
raises :class:`~medfed.errors.SecureAggregationError` naming the malformed value: a message from
the network is never trusted to be well formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.errors import SecureAggregationError
from medfed.secagg.keys import KeyBundle, KeyRoster, SiteSecrets, threshold_for
from medfed.secagg.reveal import Revealed, UnmaskAnswer, UnmaskRequest
from medfed.secagg.shares import EncryptedShare, HeldShares, PeerShares

T = TypeVar("T")
Json = dict[str, Any]


def _hex(value: bytes) -> str:
    return value.hex()


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("not a hex string")
    return bytes.fromhex(value)


def integer(value: Any) -> int:
    """``value`` if it is an integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def text(value: Any) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _big(value: Any) -> int:
    return int(text(value), 16)


def read(what: str, data: Any, parse: Callable[[Any], T]) -> T:
    """``parse(data)``, or a :class:`SecureAggregationError` naming ``what`` was malformed."""
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SecureAggregationError(
            f"a secure aggregation {what} is malformed",
            hint="the sites and the aggregator must run the same medfed version",
        ) from None


def bundle_to_json(bundle: KeyBundle) -> Json:
    return {
        "site_id": bundle.site_id,
        "run_id": bundle.run_id,
        "epoch": bundle.epoch,
        "mask_public": _hex(bundle.mask_public),
        "share_public": _hex(bundle.share_public),
        "signature": "" if bundle.signature is None else _hex(bundle.signature),
    }


def bundle_from_json(data: Any) -> KeyBundle:
    signature = text(data["signature"])
    return KeyBundle(
        site_id=text(data["site_id"]),
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        mask_public=_bytes(data["mask_public"]),
        share_public=_bytes(data["share_public"]),
        signature=bytes.fromhex(signature) if signature else None,
    )


def roster_to_json(roster: KeyRoster) -> Json:
    return {
        "run_id": roster.run_id,
        "epoch": roster.epoch,
        "bundles": [bundle_to_json(b) for b in roster.bundles],
        "excluded": dict(roster.excluded),
    }


def roster_from_json(data: Any) -> KeyRoster:
    bundles = tuple(bundle_from_json(item) for item in data["bundles"])
    return KeyRoster(
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        bundles=bundles,
        excluded=MappingProxyType({text(k): text(v) for k, v in dict(data["excluded"]).items()}),
        threshold=threshold_for(len(bundles)),
    )


def secrets_to_json(secrets: SiteSecrets) -> Json:
    """The site's private keys: written only to the site's own 0600 state file."""
    share_key = secrets.share_key.private_bytes_raw()
    return {
        "site_id": secrets.site_id,
        "run_id": secrets.run_id,
        "epoch": secrets.epoch,
        "rounds": list(secrets.rounds),
        "mask_key": _hex(secrets.mask_key_bytes()),
        "share_key": _hex(share_key),
        "self_seeds": {str(r): _hex(seed) for r, seed in secrets.self_seeds.items()},
    }


def secrets_from_json(data: Any) -> SiteSecrets:
    return SiteSecrets(
        site_id=text(data["site_id"]),
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        rounds=tuple(integer(r) for r in data["rounds"]),
        mask_key=X25519PrivateKey.from_private_bytes(_bytes(data["mask_key"])),
        share_key=X25519PrivateKey.from_private_bytes(_bytes(data["share_key"])),
        self_seeds=MappingProxyType(
            {int(r): _bytes(seed) for r, seed in dict(data["self_seeds"]).items()}
        ),
    )


def encrypted_to_json(item: EncryptedShare) -> Json:
    return {
        "sender": item.sender,
        "recipient": item.recipient,
        "run_id": item.run_id,
        "epoch": item.epoch,
        "nonce": _hex(item.nonce),
        "ciphertext": _hex(item.ciphertext),
    }


def encrypted_from_json(data: Any) -> EncryptedShare:
    return EncryptedShare(
        sender=text(data["sender"]),
        recipient=text(data["recipient"]),
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        nonce=_bytes(data["nonce"]),
        ciphertext=_bytes(data["ciphertext"]),
    )


def peer_shares_to_json(shares: PeerShares) -> Json:
    return {
        "owner": shares.owner,
        "holder": shares.holder,
        "x": shares.x,
        "mask_key": format(shares.mask_key, "x"),
        "self_seeds": {str(r): format(v, "x") for r, v in shares.self_seeds.items()},
    }


def peer_shares_from_json(data: Any) -> PeerShares:
    return PeerShares(
        owner=text(data["owner"]),
        holder=text(data["holder"]),
        x=integer(data["x"]),
        mask_key=_big(data["mask_key"]),
        self_seeds=MappingProxyType({int(r): _big(v) for r, v in dict(data["self_seeds"]).items()}),
    )


def held_to_json(held: HeldShares) -> Json:
    return {
        "holder": held.holder,
        "run_id": held.run_id,
        "epoch": held.epoch,
        "rounds": list(held.rounds),
        "threshold": held.threshold,
        "members": list(held.members),
        "shares": {site: peer_shares_to_json(s) for site, s in held.shares.items()},
    }


def held_from_json(data: Any) -> HeldShares:
    return HeldShares(
        holder=text(data["holder"]),
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        rounds=tuple(integer(r) for r in data["rounds"]),
        threshold=integer(data["threshold"]),
        members=tuple(text(m) for m in data["members"]),
        shares=MappingProxyType(
            {text(k): peer_shares_from_json(v) for k, v in dict(data["shares"]).items()}
        ),
    )


def revealed_to_json(revealed: Revealed) -> Json:
    return {
        "self_seeds": sorted([site, r] for site, r in revealed.self_seeds),
        "pair_keys": sorted([site, r] for site, r in revealed.pair_keys),
        "mask_keys": sorted(revealed.mask_keys),
    }


def revealed_from_json(data: Any) -> Revealed:
    return Revealed(
        self_seeds=frozenset((text(s), integer(r)) for s, r in data["self_seeds"]),
        pair_keys=frozenset((text(s), integer(r)) for s, r in data["pair_keys"]),
        mask_keys=frozenset(text(s) for s in data["mask_keys"]),
    )


def request_to_json(request: UnmaskRequest) -> Json:
    return {
        "run_id": request.run_id,
        "epoch": request.epoch,
        "round": request.round,
        "survivors": list(request.survivors),
        "dropped": list(request.dropped),
        "recover_keys": list(request.recover_keys),
    }


def request_from_json(data: Any) -> UnmaskRequest:
    return UnmaskRequest(
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        round=integer(data["round"]),
        survivors=tuple(text(s) for s in data["survivors"]),
        dropped=tuple(text(s) for s in data["dropped"]),
        recover_keys=tuple(text(s) for s in data["recover_keys"]),
    )


def answer_to_json(answer: UnmaskAnswer) -> Json:
    return {
        "site_id": answer.site_id,
        "run_id": answer.run_id,
        "epoch": answer.epoch,
        "round": answer.round,
        "x": answer.x,
        "self_seed_shares": {k: format(v, "x") for k, v in answer.self_seed_shares.items()},
        "pair_keys": {k: _hex(v) for k, v in answer.pair_keys.items()},
        "mask_key_shares": {k: format(v, "x") for k, v in answer.mask_key_shares.items()},
    }


def answer_from_json(data: Any) -> UnmaskAnswer:
    return UnmaskAnswer(
        site_id=text(data["site_id"]),
        run_id=text(data["run_id"]),
        epoch=integer(data["epoch"]),
        round=integer(data["round"]),
        x=integer(data["x"]),
        self_seed_shares=_mapping(data["self_seed_shares"], _big),
        pair_keys=_mapping(data["pair_keys"], _bytes),
        mask_key_shares=_mapping(data["mask_key_shares"], _big),
    )


def _mapping(data: Any, parse: Callable[[Any], T]) -> Mapping[str, T]:
    return MappingProxyType({text(k): parse(v) for k, v in dict(data).items()})
