"""The site's side of unmasking: what it reveals for a round, and what it refuses to reveal.

After the masked inputs of a round are in, the aggregator asks every surviving site for:

- its share of each survivor's self-mask seed of the round (so the self-masks can be removed);
- its own round key with each dropped site (the pairwise masks that no longer cancel);
- its share of a dropped site's mask key, only for the dropped sites named in ``recover_keys``
  (when a survivor that could reveal its round key is itself gone by now).

A site refuses to reveal, for the same peer, anything that together with the peer's masked input
gives that input away: a self-mask share of the round and a round key or mask-key share of the
same peer (the rule of Bonawitz et al. that keeps a live site safe when the aggregator calls it
dropped). Because a mask key opens every round of its epoch, a site never reveals a peer's
mask-key share once it revealed any of the peer's self-mask shares in the epoch, and never a
self-mask share once it revealed the mask key. :class:`Revealed` is the site's record of what it
has revealed in the epoch; the site keeps it between requests (on disk, with its keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NoReturn

from medfed.errors import SecureAggregationError
from medfed.secagg.keys import KeyRoster, SiteSecrets
from medfed.secagg.masked_input import pair_key
from medfed.secagg.shares import HeldShares

_REFUSED = "the aggregator asked for secrets that would unmask one site; nothing was revealed"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskRequest:
    """The aggregator's question for one round: who sent an input and who did not."""

    run_id: str
    epoch: int
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    recover_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class UnmaskAnswer:
    """One surviving site's answer: shares at its point ``x`` and its own round keys."""

    site_id: str
    run_id: str
    epoch: int
    round: int
    x: int
    self_seed_shares: Mapping[str, int] = field(repr=False)
    pair_keys: Mapping[str, bytes] = field(repr=False)
    mask_key_shares: Mapping[str, int] = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Revealed:
    """What one site has revealed in one key epoch: (peer, round) pairs and mask keys."""

    self_seeds: frozenset[tuple[str, int]] = frozenset()
    pair_keys: frozenset[tuple[str, int]] = frozenset()
    mask_keys: frozenset[str] = frozenset()


def answer_unmasking(
    *,
    secrets: SiteSecrets,
    roster: KeyRoster,
    held: HeldShares,
    request: UnmaskRequest,
    revealed: Revealed,
) -> tuple[UnmaskAnswer, Revealed]:
    """The site's answer to ``request`` and its record of what it has now revealed.

    Raises:
        SecureAggregationError: The request is for another run, epoch or round; does not account
            for every member exactly once; names fewer survivors than the threshold; or asks for
            anything that, with what the site revealed before, would unmask one site.
    """
    _check_request(secrets=secrets, held=held, request=request)
    round_id = request.round
    for peer in request.survivors:
        if peer in revealed.mask_keys or (peer, round_id) in revealed.pair_keys:
            _refuse(secrets, round_id, f"a self-mask share of {peer}, whose mask was revealed")
    for peer in request.dropped:
        if (peer, round_id) in revealed.self_seeds:
            _refuse(secrets, round_id, f"the mask of {peer}, whose self-mask share was revealed")
    for peer in request.recover_keys:
        if any(owner == peer for owner, _ in revealed.self_seeds):
            _refuse(
                secrets,
                round_id,
                f"the mask key of {peer}, whose self-mask share was revealed in this key epoch",
            )
    own_x = held.shares[secrets.site_id].x
    answer = UnmaskAnswer(
        site_id=secrets.site_id,
        run_id=held.run_id,
        epoch=held.epoch,
        round=round_id,
        x=own_x,
        self_seed_shares=MappingProxyType(
            {peer: held.shares[peer].self_seeds[round_id] for peer in request.survivors}
        ),
        pair_keys=MappingProxyType(
            {
                peer: pair_key(secrets=secrets, roster=roster, peer=peer, round_id=round_id)
                for peer in request.dropped
            }
        ),
        mask_key_shares=MappingProxyType(
            {peer: held.shares[peer].mask_key for peer in request.recover_keys}
        ),
    )
    record = Revealed(
        self_seeds=revealed.self_seeds | {(peer, round_id) for peer in request.survivors},
        pair_keys=revealed.pair_keys | {(peer, round_id) for peer in request.dropped},
        mask_keys=revealed.mask_keys | set(request.recover_keys),
    )
    return answer, record


def _check_request(*, secrets: SiteSecrets, held: HeldShares, request: UnmaskRequest) -> None:
    where = f"{secrets.site_id}: unmasking request for round {request.round}"
    if (request.run_id, request.epoch) != (held.run_id, held.epoch) or held.holder != (
        secrets.site_id
    ):
        raise SecureAggregationError(
            f"{where} is for run {request.run_id} epoch {request.epoch}, the shares held are "
            f"{held.holder}'s for run {held.run_id} epoch {held.epoch}",
            hint="answer with the keys and shares of the request's key epoch",
        )
    if request.round not in held.rounds:
        raise SecureAggregationError(
            f"{where}: the round is outside key epoch {held.epoch}",
            hint="start a new key epoch for rounds after the last one of this epoch",
        )
    survivors, dropped = set(request.survivors), set(request.dropped)
    both = sorted(survivors & dropped)
    if both:
        _refuse(secrets, request.round, f"both the self-mask share and the mask of {both[0]}")
    if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
        raise SecureAggregationError(f"{where} names a site twice", hint=_REFUSED)
    if survivors | dropped != set(held.members):
        raise SecureAggregationError(
            f"{where} accounts for {sorted(survivors | dropped)}, not for the epoch's members "
            f"{list(held.members)}",
            hint="name every member of the key epoch once, as a survivor or as dropped",
        )
    if secrets.site_id not in survivors:
        raise SecureAggregationError(
            f"{where} calls this site dropped; only survivors answer", hint=_REFUSED
        )
    if len(survivors) < held.threshold:
        raise SecureAggregationError(
            f"{where} names {len(survivors)} survivor(s), {held.threshold} needed: the sum "
            "would be too close to one site's input",
        )
    if not set(request.recover_keys) <= dropped:
        raise SecureAggregationError(
            f"{where} asks for the mask keys of sites it does not call dropped", hint=_REFUSED
        )


def _refuse(secrets: SiteSecrets, round_id: int, what: str) -> NoReturn:
    raise SecureAggregationError(
        f"{secrets.site_id} refuses to reveal {what} (round {round_id})", hint=_REFUSED
    )
