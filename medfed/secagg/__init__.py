"""Secure aggregation: the aggregator learns the weighted sum of the sites' updates, nothing else.

Pairwise masking in the style of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", ACM CCS 2017 (https://doi.org/10.1145/3133956.3133982).
This package is the protocol's pure core: no I/O, no Flower, no torch; the sites and the
aggregator call it and carry its values in their messages.

**Threat model.** The aggregator is honest but curious: it runs the protocol as written (routes
every message, sends every site the same view of who is in the round) and tries to learn more
from what it sees. Against it the protocol protects each site's update, patient count and
metrics: what the aggregator receives from one site is uniformly random on its own, and the only
thing it can unmask is the sum over at least ``threshold`` sites (a majority of the key epoch,
at least two). A site that the aggregator calls dropped stays protected by its self-mask, since
no site reveals both a peer's self-mask share and that peer's mask (:mod:`.reveal`).
It does *not* protect against an aggregator that deviates from the protocol (sending sites
different views of a round, dropping honest sites on purpose until fewer than the threshold are
left, which abandons rounds), nor against the aggregator colluding with ``threshold - 1`` sites,
who together hold enough shares to unmask one site. Secure aggregation hides individual updates,
not the sum: the sum of counts, updates and metrics is still a release, which each site's DP
noise (or its policy) must cover. With two sites each site can subtract its own input from the
sum; that is inherent to any sum.

**Stages** (one key epoch covers a run, or a fixed list of its rounds):

1. each site makes :func:`new_site_secrets` and sends its :func:`advertise` bundle (X25519
   public keys signed with its Ed25519 ledger key); each site checks the bundles with
   :func:`verify_bundles` against the ledger keys it knows: forged or unsigned bundles are
   excluded, named, with the reason;
2. each site :func:`distribute_shares` (Shamir shares of its mask key and of its self-mask seed
   for every round of the epoch, encrypted for each peer) and :func:`open_shares` of the others;
3. per round, each site sends :func:`mask_input` of its :func:`encode_weighted` update;
4. per round, each surviving site answers the aggregator's :class:`UnmaskRequest` with
   :func:`answer_unmasking`, and the aggregator computes :func:`unmask_sum`, then
   :func:`decode_weighted_sum`. If a survivor goes silent before answering while a site has
   dropped, :func:`keys_to_recover` names the mask keys a follow-up request must ask for.

Keys are agreed and shares distributed once per epoch: a round costs one masked upload (the
size of the float32 update plus one word for the count and one per extra value) and one small
answer of shares and round keys; a dropout needs no new exchange. A dropped site's recovered
mask key opens all its masks of the epoch, so that site sits out the rest of the epoch; and a
site whose self-mask of an earlier round was revealed cannot have its mask key recovered (the
survivors refuse), so such a round is abandoned and the next one starts a new epoch. A site
must mask at most one input per round: two inputs masked for the same round differ by exactly
the difference of the inputs.

**Encoding bound** (:mod:`.encoding`): with at most ``n`` sites, integer weights at most ``W``
and values at most ``B`` in absolute value (the L-infinity clipping bound of the update and the
extras), fixed-point encoding modulo 2^32 cannot wrap when
``n * rint(W * B * scale) <= 2^31 - 1`` (that is, ``n W B scale < 2^31``) and
``n * W <= 2^31 - 1``; :func:`choose_scale` picks the largest power-of-two scale that keeps it
and refuses parameters whose error per coordinate of the sum, ``n / (2 scale)``, would exceed
the ``max_error`` asked for. Values beyond ``B`` are refused, never wrapped.
"""

from medfed.secagg.encoding import (
    FixedPoint,
    WeightedSum,
    choose_scale,
    decode_weighted_sum,
    encode_weighted,
)
from medfed.secagg.keys import (
    KeyBundle,
    KeyRoster,
    SiteSecrets,
    advertise,
    new_site_secrets,
    threshold_for,
    verify_bundles,
)
from medfed.secagg.masked_input import MaskedInput, mask_input
from medfed.secagg.reveal import Revealed, UnmaskAnswer, UnmaskRequest, answer_unmasking
from medfed.secagg.shares import (
    EncryptedShare,
    HeldShares,
    PeerShares,
    ShareDistribution,
    distribute_shares,
    open_shares,
)
from medfed.secagg.unmask import SecureSum, keys_to_recover, unmask_sum

__all__ = [
    "EncryptedShare",
    "FixedPoint",
    "HeldShares",
    "KeyBundle",
    "KeyRoster",
    "MaskedInput",
    "PeerShares",
    "Revealed",
    "SecureSum",
    "ShareDistribution",
    "SiteSecrets",
    "UnmaskAnswer",
    "UnmaskRequest",
    "WeightedSum",
    "advertise",
    "answer_unmasking",
    "choose_scale",
    "decode_weighted_sum",
    "distribute_shares",
    "encode_weighted",
    "keys_to_recover",
    "mask_input",
    "new_site_secrets",
    "open_shares",
    "threshold_for",
    "unmask_sum",
    "verify_bundles",
]
