"""The aggregator's side of unmasking: the sum of the survivors' inputs, and nothing else.

The aggregator adds the survivors' masked inputs modulo 2^32; their pairwise masks with each
other cancel. What remains is removed with the answers of the survivors: each survivor's
self-mask (its seed recovered from at least ``threshold`` shares) and, for each pair of a
survivor and a dropped site, the pair's mask (from the survivor's round key, or, if that
survivor did not answer, from the dropped site's mask key recovered from shares). The result is
only ever the sum over at least ``threshold`` (at least two) sites; a round that cannot be
unmasked completely is abandoned with :class:`~medfed.errors.SecureAggregationError`, and no
partial sum is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.errors import SecureAggregationError
from medfed.secagg import shamir
from medfed.secagg.keys import KeyRoster
from medfed.secagg.masked_input import MaskedInput
from medfed.secagg.masks import (
    WORD,
    add_mask,
    pair_round_key,
    pair_sign,
    pairwise_seed,
    self_round_key,
)
from medfed.secagg.reveal import UnmaskAnswer, UnmaskRequest


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SecureSum:
    """The sum modulo 2^32 of the encoded inputs of ``sites`` (two or more) in one round."""

    run_id: str
    epoch: int
    round: int
    sites: tuple[str, ...]
    total: np.ndarray


def keys_to_recover(*, request: UnmaskRequest, answers: Sequence[UnmaskAnswer]) -> tuple[str, ...]:
    """The dropped sites whose mask keys a follow-up request must ask for.

    Those are the dropped sites paired with a survivor that sent an input but no answer: their
    pair's mask can only come from the dropped site's key.
    """
    answered = {answer.site_id for answer in answers}
    silent = [site for site in request.survivors if site not in answered]
    if not silent:
        return ()
    return tuple(sorted(request.dropped))


def unmask_sum(
    *,
    roster: KeyRoster,
    request: UnmaskRequest,
    masked: Sequence[MaskedInput],
    answers: Sequence[UnmaskAnswer],
) -> SecureSum:
    """The sum of the survivors' encoded inputs, with every mask removed.

    ``masked`` holds one input of each survivor of ``request``; ``answers`` are the survivors'
    answers to it (and to a follow-up request with ``recover_keys``, if one was needed).

    Raises:
        SecureAggregationError: The round is abandoned: fewer survivors or answers than the
            threshold, an input or answer from outside the round, inputs of different lengths, or
            a mask that cannot be removed. Nothing of the sum is returned.
    """
    where = f"round {request.round} of run {request.run_id} epoch {request.epoch}"
    inputs = _inputs_by_site(roster=roster, request=request, masked=masked, where=where)
    by_site = _answers_by_site(roster=roster, request=request, answers=answers, where=where)
    total = np.zeros(_common_length(inputs, where), dtype=WORD)
    for vector in inputs.values():
        np.add(total, vector, out=total)
    for site in request.survivors:
        seed = shamir.combine(
            {a.x: a.self_seed_shares[site] for a in by_site.values() if site in a.self_seed_shares},
            threshold=roster.threshold,
            what=f"{where}: the self-mask seed of {site}",
        )
        key = self_round_key(
            seed, run_id=roster.run_id, epoch=roster.epoch, site_id=site, round_id=request.round
        )
        add_mask(total, key, sign=-1)
    recovered: dict[str, X25519PrivateKey] = {}
    for dropped in request.dropped:
        for site in request.survivors:
            answer = by_site.get(site)
            if answer is not None and dropped in answer.pair_keys:
                key = answer.pair_keys[dropped]
            else:
                if dropped not in recovered:
                    recovered[dropped] = _recover_mask_key(
                        roster=roster, answers=by_site, dropped=dropped, where=where
                    )
                key = _pair_key_from(roster, recovered[dropped], dropped, site, request.round)
            # The survivor's input carries this pair's mask with the survivor's sign: undo it.
            add_mask(total, key, sign=-pair_sign(site, dropped))
    return SecureSum(
        run_id=request.run_id,
        epoch=request.epoch,
        round=request.round,
        sites=tuple(sorted(request.survivors)),
        total=total,
    )


def _inputs_by_site(
    *, roster: KeyRoster, request: UnmaskRequest, masked: Sequence[MaskedInput], where: str
) -> dict[str, np.ndarray]:
    if (request.run_id, request.epoch) != (roster.run_id, roster.epoch):
        raise SecureAggregationError(
            f"{where}: the roster is of run {roster.run_id} epoch {roster.epoch}",
            hint="unmask with the roster of the request's key epoch",
        )
    named = set(request.survivors) | set(request.dropped)
    if set(request.survivors) & set(request.dropped) or not named <= set(roster.sites):
        raise SecureAggregationError(
            f"{where}: survivors {list(request.survivors)} and dropped {list(request.dropped)} "
            "must be distinct sites of the roster",
            hint="call each site of the key epoch either a survivor or dropped",
        )
    if len(set(request.survivors)) < roster.threshold:
        raise SecureAggregationError(
            f"{where}: {len(set(request.survivors))} site(s) sent an input, {roster.threshold} "
            "needed; the round is abandoned"
        )
    inputs: dict[str, np.ndarray] = {}
    for item in masked:
        if (item.run_id, item.epoch, item.round) != (request.run_id, request.epoch, request.round):
            raise SecureAggregationError(
                f"{where}: the input of {item.site_id} is for round {item.round} epoch {item.epoch}"
            )
        if item.site_id in inputs:
            raise SecureAggregationError(f"{where}: two inputs of {item.site_id}")
        inputs[item.site_id] = item.vector
    if set(inputs) != set(request.survivors):
        raise SecureAggregationError(
            f"{where}: inputs from {sorted(inputs)}, but the survivors are "
            f"{sorted(request.survivors)}",
            hint="list as survivors exactly the sites whose masked inputs are summed",
        )
    return inputs


def _common_length(inputs: Mapping[str, np.ndarray], where: str) -> int:
    shapes = {site: vector.shape for site, vector in inputs.items()}
    dtypes = {vector.dtype for vector in inputs.values()}
    if len(set(shapes.values())) != 1 or dtypes != {np.dtype(np.uint32)}:
        raise SecureAggregationError(
            f"{where}: the masked inputs are not uint32 vectors of one length ({shapes})",
            hint="every site must encode the same layout: check the run's model and extras",
        )
    (shape,) = set(shapes.values())
    if len(shape) != 1:
        raise SecureAggregationError(f"{where}: the masked inputs have shape {shape}, not 1-D")
    return int(shape[0])


def _answers_by_site(
    *, roster: KeyRoster, request: UnmaskRequest, answers: Sequence[UnmaskAnswer], where: str
) -> dict[str, UnmaskAnswer]:
    by_site: dict[str, UnmaskAnswer] = {}
    for answer in answers:
        if (answer.run_id, answer.epoch, answer.round) != (
            request.run_id,
            request.epoch,
            request.round,
        ):
            raise SecureAggregationError(
                f"{where}: the answer of {answer.site_id} is for round {answer.round} epoch "
                f"{answer.epoch}"
            )
        if answer.site_id not in request.survivors:
            raise SecureAggregationError(
                f"{where}: an answer from {answer.site_id}, which sent no input"
            )
        if answer.x != roster.point_of(answer.site_id):
            raise SecureAggregationError(
                f"{where}: the answer of {answer.site_id} holds shares at point {answer.x}, not "
                f"at its point {roster.point_of(answer.site_id)}"
            )
        if (
            set(answer.self_seed_shares) != set(request.survivors)
            or set(answer.pair_keys) != set(request.dropped)
            or not set(answer.mask_key_shares) <= set(request.dropped)
        ):
            raise SecureAggregationError(
                f"{where}: the answer of {answer.site_id} was given to another request",
                hint="unmask with the request the sites answered",
            )
        earlier = by_site.get(answer.site_id)
        by_site[answer.site_id] = answer if earlier is None else _merged(earlier, answer)
    return by_site


def _merged(first: UnmaskAnswer, second: UnmaskAnswer) -> UnmaskAnswer:
    """One site's answers to a request and to its follow-up, as one answer."""
    if first.x != second.x:
        raise SecureAggregationError(
            f"the answers of {first.site_id} give two share points ({first.x}, {second.x})"
        )
    return UnmaskAnswer(
        site_id=first.site_id,
        run_id=first.run_id,
        epoch=first.epoch,
        round=first.round,
        x=first.x,
        self_seed_shares={**first.self_seed_shares, **second.self_seed_shares},
        pair_keys={**first.pair_keys, **second.pair_keys},
        mask_key_shares={**first.mask_key_shares, **second.mask_key_shares},
    )


def _recover_mask_key(
    *, roster: KeyRoster, answers: Mapping[str, UnmaskAnswer], dropped: str, where: str
) -> X25519PrivateKey:
    raw = shamir.combine(
        {a.x: a.mask_key_shares[dropped] for a in answers.values() if dropped in a.mask_key_shares},
        threshold=roster.threshold,
        what=f"{where}: the mask key of {dropped}",
    )
    key = X25519PrivateKey.from_private_bytes(raw)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    if public != roster.bundle_of(dropped).mask_public:
        raise SecureAggregationError(
            f"{where}: the shares of {dropped}'s mask key give another key than it advertised",
            hint="a share was damaged or is from another key epoch: start a new key epoch",
        )
    return key


def _pair_key_from(
    roster: KeyRoster, key: X25519PrivateKey, dropped: str, survivor: str, round_id: int
) -> bytes:
    seed = pairwise_seed(
        own_key=key,
        own_site=dropped,
        own_public=roster.bundle_of(dropped).mask_public,
        peer_site=survivor,
        peer_public=roster.bundle_of(survivor).mask_public,
        run_id=roster.run_id,
        epoch=roster.epoch,
    )
    return pair_round_key(seed, round_id=round_id)
