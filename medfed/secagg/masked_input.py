"""The site's masked input: its encoded vector plus its self-mask and its pairwise masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfed.errors import SecureAggregationError
from medfed.secagg.keys import KeyRoster, SiteSecrets
from medfed.secagg.masks import (
    add_mask,
    pair_round_key,
    pair_sign,
    pairwise_seed,
    self_round_key,
)
from medfed.secagg.shares import HeldShares


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MaskedInput:
    """What the aggregator receives from one site in one round: uniformly random on its own."""

    site_id: str
    run_id: str
    epoch: int
    round: int
    vector: np.ndarray


def pair_key(*, secrets: SiteSecrets, roster: KeyRoster, peer: str, round_id: int) -> bytes:
    """The round key of the mask ``secrets``' site shares with ``peer`` in round ``round_id``."""
    seed = pairwise_seed(
        own_key=secrets.mask_key,
        own_site=secrets.site_id,
        own_public=roster.bundle_of(secrets.site_id).mask_public,
        peer_site=peer,
        peer_public=roster.bundle_of(peer).mask_public,
        run_id=roster.run_id,
        epoch=roster.epoch,
    )
    return pair_round_key(seed, round_id=round_id)


def mask_input(
    *,
    secrets: SiteSecrets,
    roster: KeyRoster,
    held: HeldShares,
    round_id: int,
    encoded: np.ndarray,
) -> MaskedInput:
    """The site's ``encoded`` vector (uint32) masked for round ``round_id`` of its key epoch.

    Raises:
        SecureAggregationError: The round is not one of the epoch's, the shares belong to
            another site or epoch, or ``encoded`` is not a 1-D uint32 vector.
    """
    where = f"{secrets.site_id} round {round_id}"
    if round_id not in secrets.rounds:
        raise SecureAggregationError(
            f"{where}: the round is outside key epoch {secrets.epoch} (rounds "
            f"{secrets.rounds[0]}..{secrets.rounds[-1]})",
            hint="start a new key epoch for the rounds after the last one of this epoch",
        )
    if (held.holder, held.run_id, held.epoch) != (secrets.site_id, secrets.run_id, secrets.epoch):
        raise SecureAggregationError(
            f"{where}: the shares held are {held.holder}'s for epoch {held.epoch}",
            hint="mask with the shares this site opened in the same key epoch",
        )
    if encoded.dtype != np.uint32 or encoded.ndim != 1:
        raise SecureAggregationError(
            f"{where}: the encoded input is {encoded.dtype} of shape {encoded.shape}, not a 1-D "
            "uint32 vector",
            hint="encode the update with medfed.secagg.encode_weighted before masking it",
        )
    vector = encoded.copy()
    self_key = self_round_key(
        secrets.self_seeds[round_id],
        run_id=secrets.run_id,
        epoch=secrets.epoch,
        site_id=secrets.site_id,
        round_id=round_id,
    )
    add_mask(vector, self_key, sign=1)
    for peer in held.members:
        if peer != secrets.site_id:
            key = pair_key(secrets=secrets, roster=roster, peer=peer, round_id=round_id)
            add_mask(vector, key, sign=pair_sign(secrets.site_id, peer))
    return MaskedInput(
        site_id=secrets.site_id,
        run_id=secrets.run_id,
        epoch=secrets.epoch,
        round=round_id,
        vector=vector,
    )
