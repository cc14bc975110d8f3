"""An in-memory run of the secure-aggregation protocol: n sites and an aggregator, stage by stage.

The aggregator here does what an honest-but-curious one does: it routes every message, tells
every site the same story, and keeps everything it sees (``Federation.seen``). Sites can fall
silent at any stage, and a test can change a message on its way to model forgery or damage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.secagg import (
    EncryptedShare,
    HeldShares,
    KeyBundle,
    KeyRoster,
    MaskedInput,
    Revealed,
    SecureSum,
    SiteSecrets,
    UnmaskAnswer,
    UnmaskRequest,
    advertise,
    answer_unmasking,
    distribute_shares,
    keys_to_recover,
    mask_input,
    new_site_secrets,
    open_shares,
    unmask_sum,
    verify_bundles,
)

RUN = "run-7"
EPOCH = 1


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A reproducible byte source, so that a test's keys and masks are the same every time."""
    rng = np.random.default_rng(seed)
    return lambda size: rng.bytes(size)


@dataclass
class Federation:
    """The state of every party after key agreement and share distribution."""

    sites: tuple[str, ...]
    rounds: tuple[int, ...]
    ledger_keys: dict[str, Ed25519PrivateKey]
    secrets: dict[str, SiteSecrets]
    bundles: list[KeyBundle]
    rosters: dict[str, KeyRoster]
    aggregator_roster: KeyRoster
    held: dict[str, HeldShares] = field(default_factory=dict)
    revealed: dict[str, Revealed] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    seen: list[object] = field(default_factory=list)

    @property
    def public_ledger_keys(self) -> dict[str, Ed25519PublicKey]:
        return {site: key.public_key() for site, key in self.ledger_keys.items()}


def advertise_keys(
    sites: Sequence[str],
    *,
    rounds: Sequence[int] = (1,),
    seed: int = 0,
    forge: Callable[[KeyBundle], KeyBundle] | None = None,
) -> Federation:
    """Stage 1: keys made and advertised; every site and the aggregator verify the bundles."""
    random_bytes = seeded_bytes(seed)
    ledger_keys = {site: Ed25519PrivateKey.from_private_bytes(random_bytes(32)) for site in sites}
    secrets = {
        site: new_site_secrets(
            site_id=site, run_id=RUN, epoch=EPOCH, rounds=rounds, random_bytes=random_bytes
        )
        for site in sites
    }
    bundles = [advertise(secrets=secrets[s], ledger_key=ledger_keys[s]) for s in sites]
    if forge is not None:
        bundles = [forge(bundle) for bundle in bundles]
    public = {site: key.public_key() for site, key in ledger_keys.items()}

    def roster() -> KeyRoster:
        return verify_bundles(bundles=bundles, ledger_keys=public, run_id=RUN, epoch=EPOCH)

    fed = Federation(
        sites=tuple(sites),
        rounds=tuple(rounds),
        ledger_keys=ledger_keys,
        secrets=secrets,
        bundles=bundles,
        rosters={},
        aggregator_roster=roster(),
    )
    fed.rosters = {site: roster() for site in fed.aggregator_roster.sites}
    fed.seen.extend(bundles)
    return fed


def share_keys(
    fed: Federation,
    *,
    seed: int = 1,
    silent: Iterable[str] = (),
    tamper: Callable[[EncryptedShare], EncryptedShare] | None = None,
) -> Federation:
    """Stage 2: shares distributed through the aggregator and opened; ``silent`` sites send none."""
    random_bytes = seeded_bytes(seed)
    quiet = set(silent)
    senders = [s for s in fed.aggregator_roster.sites if s not in quiet]
    distributions = {
        site: distribute_shares(
            secrets=fed.secrets[site], roster=fed.rosters[site], random_bytes=random_bytes
        )
        for site in senders
    }
    routed: dict[str, list[EncryptedShare]] = {site: [] for site in senders}
    for distribution in distributions.values():
        for item in distribution.outgoing:
            fed.seen.append(item)
            if item.recipient in routed:
                routed[item.recipient].append(tamper(item) if tamper else item)
    for site in senders:
        fed.held[site] = open_shares(
            secrets=fed.secrets[site],
            roster=fed.rosters[site],
            own=distributions[site].own,
            incoming=routed[site],
        )
        fed.revealed[site] = Revealed()
    fed.members = tuple(sorted(senders))
    return fed


def setup(sites: Sequence[str], *, rounds: Sequence[int] = (1,), seed: int = 0) -> Federation:
    """Stages 1 and 2 with every site answering."""
    return share_keys(advertise_keys(sites, rounds=rounds, seed=seed), seed=seed + 1)


def masked_inputs(
    fed: Federation, *, round_id: int, inputs: Mapping[str, np.ndarray]
) -> dict[str, MaskedInput]:
    """Stage 3: each site in ``inputs`` masks its encoded vector."""
    masked = {
        site: mask_input(
            secrets=fed.secrets[site],
            roster=fed.rosters[site],
            held=fed.held[site],
            round_id=round_id,
            encoded=vector,
        )
        for site, vector in inputs.items()
    }
    fed.seen.extend(masked.values())
    return masked


def ask(fed: Federation, request: UnmaskRequest, *, answering: Iterable[str]) -> list[UnmaskAnswer]:
    """Stage 4, the sites' side: each answering site answers ``request`` and keeps its record."""
    answers = []
    for site in answering:
        answer, fed.revealed[site] = answer_unmasking(
            secrets=fed.secrets[site],
            roster=fed.rosters[site],
            held=fed.held[site],
            request=request,
            revealed=fed.revealed[site],
        )
        answers.append(answer)
    fed.seen.extend(answers)
    return answers


def run_round(
    fed: Federation,
    *,
    round_id: int,
    inputs: Mapping[str, np.ndarray],
    silent_before_input: Iterable[str] = (),
    silent_before_answer: Iterable[str] = (),
) -> SecureSum:
    """Stages 3 and 4 for one round, as the aggregator drives them; the secure sum."""
    before_input, before_answer = set(silent_before_input), set(silent_before_answer)
    sending = {s: v for s, v in inputs.items() if s in fed.members and s not in before_input}
    masked = masked_inputs(fed, round_id=round_id, inputs=sending)
    survivors = tuple(sorted(masked))
    request = UnmaskRequest(
        run_id=RUN,
        epoch=EPOCH,
        round=round_id,
        survivors=survivors,
        dropped=tuple(s for s in fed.members if s not in masked),
    )
    answering = [s for s in survivors if s not in before_answer]
    answers = ask(fed, request, answering=answering)
    recover = keys_to_recover(request=request, answers=answers)
    if recover:
        follow_up = UnmaskRequest(
            run_id=RUN,
            epoch=EPOCH,
            round=round_id,
            survivors=survivors,
            dropped=request.dropped,
            recover_keys=recover,
        )
        answers += ask(fed, follow_up, answering=answering)
    return unmask_sum(
        roster=fed.aggregator_roster,
        request=request,
        masked=list(masked.values()),
        answers=answers,
    )


def plain_sum(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of encoded vectors modulo 2^32, without any masking."""
    vectors = list(vectors)
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    return total
