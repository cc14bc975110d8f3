"""A site's part in secure aggregation (:mod:`medfed.secagg`): keys, shares, masked rounds.

Four stages per key epoch and two per round, each one message from the aggregator:

``keys``    the aggregator forwards the sites' ledger public keys from its provisioned registry;
            the site checks its own is among them unchanged and pins the others on first use
            (a key that later changes for a site id is refused), makes its epoch's secrets and
            answers its X25519 key bundle signed with its ledger key;
``shares``  the site verifies every bundle against the pinned ledger keys (forged or unsigned
            ones are excluded and named in its answer) and answers its encrypted shares;
``open``    the site decrypts the shares forwarded to it: their senders are the epoch's members;
``train``   the site trains as in a plain round (ledger reserve and commit), and answers its
            weight change clipped to the run's bound, weighted by its released patient count,
            with its training loss, encoded and masked: one uint32 vector and its new ledger
            lines;
``unmask``  the site answers the shares and round keys that remove the masks of the sum, and
            refuses anything that would unmask one site (:mod:`medfed.secagg.reveal`), or a
            distributed-noise round's sum of fewer inputs than its noise share counted on.

With distributed noise (the stage's ``distributed`` settings) the ``train`` stage takes one
full-batch step instead (:mod:`medfed.site.distributed_round`): the masked vector is the site's
integer sum of its patients' clipped gradients and its count, under its share of the noise.

What is trusted: the ledger public keys of the provisioned workspace, as the aggregator
forwards them at the first epoch a site joins; an aggregator that deviates from the protocol
at that moment could forward its own keys (the threat model of :mod:`medfed.secagg` excludes
it), and pinning stops it from doing so later. The site's secrets, what it has revealed and
its masked inputs stay in ``workdir/federation/RUN/secagg`` (directories 0700, files 0600), so
a ClientApp started afresh for each message finds them, and a round asked for twice is answered
with the same masked vector, never with a second input for the same round.

**Releases.** The masked vector holds the weight change (the DP-SGD output, covered by the
round's reservation), the site's noisy training count (the ledger's ``patients`` release,
sealed: its entry holds the cost and a commitment, the values stay at the site, and the
sample rate is not computed from it; :func:`medfed.site.round_plan.plan_round`), and the
round's loss (one more coordinate of the DP-SGD steps, covered by the same reservation). The
site writes no ``train_loss`` and no per-round ``validation_dice`` release under secure
aggregation: the aggregator learns the loss only as the weighted mean over at least
``threshold`` sites, and no per-round Dice at all. The final model's Dice is released sealed
and crosses as ``[validation count, count x Dice]`` in one more masked sum (the stage's
``evaluate``), and a run that started secure gets no plain round or evaluation from the site.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.config.run import DistributedNoiseSettings
from medfed.config.site import SiteConfig
from medfed.envelope import RoundRequest, SecureReply
from medfed.errors import ConfigError, PolicyError, SecureAggregationError
from medfed.secagg import advertise as advertise_bundle
from medfed.secagg import (
    answer_unmasking,
    distribute_shares,
    encode_weighted,
    mask_input,
    new_site_secrets,
    open_shares,
    verify_bundles,
    wire,
)
from medfed.secagg.reveal import Revealed
from medfed.secagg.update import evaluation_round, flatten_change, loss_extras, run_encoding
from medfed.site import federated
from medfed.site.distributed_round import check_allowed, distributed_round
from medfed.storage import locked, make_private_dirs, read_json_object, replace_file
from medfed.types import weights_digest

log = logging.getLogger("medfed.site")

_PINS_FILE = "peer_ledger_keys.json"


def state_dir(config: SiteConfig, run_name: str) -> Path:
    """Where the site keeps its secure aggregation state for one run."""
    return config.paths.workdir / "federation" / run_name / "secagg"


def _state_path(config: SiteConfig, run_name: str, epoch: int) -> Path:
    return state_dir(config, run_name) / f"epoch-{epoch:04d}.json"


def _payload(request: RoundRequest) -> dict[str, Any]:
    if request.secure_aggregation is None:
        raise ConfigError(f"run {request.run_name!r}: the request has no secure aggregation part")
    return dict(request.secure_aggregation)


def _distributed(payload: dict[str, Any]) -> DistributedNoiseSettings | None:
    """The run's distributed-noise settings, when the stage carries them."""
    value = payload.get("distributed")
    if value is None:
        return None
    return wire.read("distributed noise settings", value, DistributedNoiseSettings.model_validate)


def _evaluated(payload: dict[str, Any]) -> bool:
    """Whether the stage is the run's secure evaluation."""
    return wire.read("evaluation request", payload, lambda p: p.get("evaluate", False) is True)


def _epoch(payload: dict[str, Any]) -> int:
    return wire.read("epoch", payload, lambda p: wire.integer(p["epoch"]))


def _load(config: SiteConfig, request: RoundRequest, epoch: int) -> dict[str, Any]:
    state = read_json_object(_state_path(config, request.run_name, epoch))
    if state is None:
        raise SecureAggregationError(
            f"site {config.site_id} has no keys for key epoch {epoch} of run {request.run_name!r}",
            hint="the key epoch starts with the keys stage; start a new key epoch",
        )
    return state


def _save(config: SiteConfig, request: RoundRequest, epoch: int, state: dict[str, Any]) -> None:
    path = _state_path(config, request.run_name, epoch)
    make_private_dirs(path.parent)
    replace_file(path, json.dumps(state, sort_keys=True).encode("utf-8"), mode=0o600)


def _locked(path: Path) -> AbstractContextManager[None]:
    """The state file's lock, its directory made private first."""
    make_private_dirs(path.parent)
    return locked(path, exclusive=True)


def _raw_public(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _ledger_keys(state: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    return wire.read(
        "ledger key list",
        state["ledger_keys"],
        lambda keys: {
            str(site): Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
            for site, raw in dict(keys).items()
        },
    )


def _pin(config: SiteConfig, forwarded: dict[str, str]) -> None:
    """Keep the peers' ledger keys seen first; refuse a key that changed for a site id."""
    from medfed.privacy.keys import load_or_create_signing_key

    own = _raw_public(load_or_create_signing_key(config.signing_key_path).public_key())
    if forwarded.get(config.site_id) != own:
        raise SecureAggregationError(
            f"the ledger key list forwarded for secure aggregation does not hold site "
            f"{config.site_id}'s own ledger key",
            hint="the aggregator's registry must hold the ledger_key.pub of the site's kit",
        )
    path = config.paths.workdir / "secagg" / _PINS_FILE
    pinned = read_json_object(path) or {}
    changed = sorted(s for s, raw in forwarded.items() if s in pinned and pinned[s] != raw)
    if changed:
        raise SecureAggregationError(
            f"the ledger keys forwarded for {changed} differ from the keys this site pinned",
            hint=f"if a site's key was replaced on purpose, remove it from {path}",
        )
    make_private_dirs(path.parent)
    replace_file(path, json.dumps({**forwarded, **pinned}, sort_keys=True).encode(), mode=0o600)


def advertise(*, config: SiteConfig, request: RoundRequest) -> SecureReply:
    """The keys stage: the site's signed key bundle for the epoch (the same one if asked again)."""
    from medfed.privacy.keys import load_or_create_signing_key

    federated.check_policy(config, request)
    payload = _payload(request)
    asked = _distributed(payload)
    if asked is not None:
        check_allowed(config, asked)
    epoch = _epoch(payload)
    rounds, forwarded = wire.read(
        "keys request",
        payload,
        lambda p: (
            tuple(wire.integer(r) for r in p["rounds"]),
            {wire.text(s): wire.text(k) for s, k in dict(p["ledger_keys"]).items()},
        ),
    )
    _pin(config, forwarded)
    path = _state_path(config, request.run_name, epoch)
    with _locked(path):
        state = read_json_object(path)
        if state is None:
            secrets = new_site_secrets(
                site_id=config.site_id, run_id=request.run_name, epoch=epoch, rounds=rounds
            )
            state = {"secrets": wire.secrets_to_json(secrets), "ledger_keys": forwarded}
            _save(config, request, epoch, state)
        secrets = wire.read("stored secrets", state["secrets"], wire.secrets_from_json)
    bundle = advertise_bundle(
        secrets=secrets, ledger_key=load_or_create_signing_key(config.signing_key_path)
    )
    return SecureReply(site_id=config.site_id, payload={"bundle": wire.bundle_to_json(bundle)})


def share(*, config: SiteConfig, request: RoundRequest) -> SecureReply:
    """The shares stage: verify the bundles, answer the encrypted shares for the others."""
    payload = _payload(request)
    epoch = _epoch(payload)
    bundles = wire.read(
        "bundle list", payload, lambda p: [wire.bundle_from_json(b) for b in p["bundles"]]
    )
    path = _state_path(config, request.run_name, epoch)
    with _locked(path):
        state = _load(config, request, epoch)
        if "outgoing" not in state:
            secrets = wire.read("stored secrets", state["secrets"], wire.secrets_from_json)
            roster = verify_bundles(
                bundles=bundles,
                ledger_keys=_ledger_keys(state),
                run_id=request.run_name,
                epoch=epoch,
            )
            distribution = distribute_shares(secrets=secrets, roster=roster)
            state |= {
                "roster": wire.roster_to_json(roster),
                "own": wire.peer_shares_to_json(distribution.own),
                "outgoing": [wire.encrypted_to_json(e) for e in distribution.outgoing],
            }
            _save(config, request, epoch, state)
            for site, why in roster.excluded.items():
                log.warning(
                    "site %s excludes %s from key epoch %d: %s", config.site_id, site, epoch, why
                )
    roster_json = state["roster"]
    return SecureReply(
        site_id=config.site_id,
        payload={"shares": state["outgoing"], "excluded": roster_json["excluded"]},
    )


def open_received(*, config: SiteConfig, request: RoundRequest) -> SecureReply:
    """The open stage: decrypt the shares forwarded; their senders are the epoch's members."""
    payload = _payload(request)
    epoch = _epoch(payload)
    incoming = wire.read(
        "share list", payload, lambda p: [wire.encrypted_from_json(e) for e in p["shares"]]
    )
    path = _state_path(config, request.run_name, epoch)
    with _locked(path):
        state = _load(config, request, epoch)
        if "held" not in state:
            if "roster" not in state:
                raise SecureAggregationError(
                    f"site {config.site_id} has sent no shares in key epoch {epoch}",
                    hint="the shares stage comes before the open stage",
                )
            held = open_shares(
                secrets=wire.read("stored secrets", state["secrets"], wire.secrets_from_json),
                roster=wire.read("stored roster", state["roster"], wire.roster_from_json),
                own=wire.read("stored share", state["own"], wire.peer_shares_from_json),
                incoming=incoming,
            )
            state |= {
                "held": wire.held_to_json(held),
                "revealed": wire.revealed_to_json(Revealed()),
                "masked": {},
            }
            _save(config, request, epoch, state)
    return SecureReply(site_id=config.site_id, payload={"members": state["held"]["members"]})


def masked_round(*, config: SiteConfig, request: RoundRequest) -> SecureReply:
    """The training stage: train, then answer the masked, weighted, clipped weight change.

    With ``evaluate`` in the stage, the same stage evaluates the model of round
    ``request.round`` instead (the run's final model), masked as the epoch's round
    :func:`medfed.secagg.update.evaluation_round`, which no training round uses.
    """
    from medfed.model_files import read_arrays, write_arrays

    effective = federated.round_config(config, request)
    if request.weights is None or request.round < 1:
        raise PolicyError(
            f"site {config.site_id}: a secure round needs a global model and a round from 1",
            hint="rounds 1 to planned_rounds train; round 0 is the initial model",
        )
    federated.check_against_aggregator(effective, request)
    payload = _payload(request)
    epoch = _epoch(payload)
    sites, max_weight, bound = wire.read(
        "round request",
        payload,
        lambda p: (wire.integer(p["sites"]), wire.integer(p["max_weight"]), float(p["bound"])),
    )
    digest = weights_digest(request.weights)
    evaluated = _evaluated(payload)
    mask_round = evaluation_round(request.planned_rounds) if evaluated else request.round
    path = _state_path(config, request.run_name, epoch)
    vector_file = path.parent / f"masked-{mask_round:04d}.safetensors"
    with _locked(path):
        state = _load(config, request, epoch)
        if "held" not in state:
            raise SecureAggregationError(
                f"site {config.site_id} holds no shares of key epoch {epoch}",
                hint="the open stage comes before the epoch's rounds",
            )
        done = state["masked"].get(str(mask_round))
        if done is not None:
            if done != digest:
                raise PolicyError(
                    f"site {config.site_id} masked round {mask_round} of run "
                    f"{request.run_name!r} already, for another global model",
                    hint="a round is masked once; start a new key epoch",
                )
            vector = read_arrays(vector_file)["masked"]
        else:
            secrets = wire.read("stored secrets", state["secrets"], wire.secrets_from_json)
            roster = wire.read("stored roster", state["roster"], wire.roster_from_json)
            held = wire.read("stored shares", state["held"], wire.held_from_json)
            if mask_round not in held.rounds:
                raise SecureAggregationError(
                    f"round {mask_round} is outside key epoch {epoch}",
                    hint="start a new key epoch for the rounds after this one",
                )
            asked = _distributed(payload)
            if evaluated:
                encoded = _encoded_evaluation(effective, request, sites, max_weight, bound)
            elif asked is not None:
                encoded = distributed_round(
                    config=effective,
                    asked=asked,
                    run_id=request.run_name,
                    round_index=request.round,
                    planned_rounds=request.planned_rounds,
                    weights=request.weights,
                    requested_noise=request.noise_multiplier,
                    members=sites,
                    max_weight=max_weight,
                )
                state.setdefault("distributed", {})[str(request.round)] = asked.sites
            else:
                encoded = _encoded_training(effective, request, sites, max_weight, bound)
            masked = mask_input(
                secrets=secrets, roster=roster, held=held, round_id=mask_round, encoded=encoded
            )
            vector = masked.vector
            write_arrays(vector_file, {"masked": vector}, mode=0o600)
            state["masked"][str(mask_round)] = digest
            _save(config, request, epoch, state)
    first, lines = federated.ledger_lines_since(effective, request.ledger_known)
    return SecureReply(
        site_id=config.site_id,
        payload={"epoch": epoch, "round": mask_round},
        masked=np.asarray(vector, dtype=np.uint32),
        ledger_first_seq=first,
        ledger_lines=lines,
    )


def _encoded_training(
    config: SiteConfig, request: RoundRequest, sites: int, max_weight: int, bound: float
) -> np.ndarray:
    """Train as in a plain round; the weighted, clipped weight change and loss, encoded."""
    assert request.weights is not None
    point = run_encoding(sites=sites, max_weight=max_weight, bound=bound)
    result = federated.train_from_request(config, request, sealed_counts=True)
    change, clipped = flatten_change(weights=result.weights, reference=request.weights, bound=bound)
    if clipped:
        log.info(
            "site %s round %d: %d coordinates of the weight change clipped to +-%g",
            config.site_id,
            request.round,
            clipped,
            bound,
        )
    return encode_weighted(
        point=point,
        weight=min(result.released_train_patients, max_weight),
        update=change,
        extras=loss_extras(result.mean_loss, bound=bound),
    )


def _encoded_evaluation(
    config: SiteConfig,
    request: RoundRequest,
    sites: int,
    max_weight: int,
    bound: float,
) -> np.ndarray:
    """The run's final model evaluated: its Dice (sealed), clipped to [0, 1] and carried as
    ``dice x bound``, weighted by the sealed validation count; weight 0 when the site releases
    no Dice, so that it adds nothing to the sum."""
    assert request.weights is not None
    federated.require_trained_in(config, request.run_name)
    point = run_encoding(sites=sites, max_weight=max_weight, bound=bound)
    outcome, counts = federated.release_dice(
        config,
        request,
        request.weights,
        weights_digest(request.weights),
        final=True,
        sealed=True,
    )
    if outcome.value is None or not np.isfinite(outcome.value):
        return encode_weighted(point=point, weight=0, update=np.zeros(0), extras=(0.0,))
    return encode_weighted(
        point=point,
        weight=min(counts.validation, max_weight),
        update=np.zeros(0),
        extras=(min(max(outcome.value, 0.0), 1.0) * bound,),
    )


def unmask(*, config: SiteConfig, request: RoundRequest) -> SecureReply:
    """The unmask stage: the shares and round keys the aggregator may have, and no more."""
    payload = _payload(request)
    epoch = _epoch(payload)
    asked = wire.read("unmask request", payload["request"], wire.request_from_json)
    if asked.run_id != request.run_name or asked.epoch != epoch:
        raise SecureAggregationError(
            f"an unmask request for run {asked.run_id!r} epoch {asked.epoch} arrived in run "
            f"{request.run_name!r} epoch {epoch}"
        )
    path = _state_path(config, request.run_name, epoch)
    with _locked(path):
        state = _load(config, request, epoch)
        shares = state.get("distributed", {}).get(str(asked.round))
        if shares is not None and len(asked.survivors) < shares:
            raise SecureAggregationError(
                f"site {config.site_id} will not unmask round {asked.round}: its noise share "
                f"counts on {shares} sites' shares in the sum and only "
                f"{len(asked.survivors)} sent an input",
                hint="the round is abandoned; the next one starts a new key epoch",
            )
        answer, revealed = answer_unmasking(
            secrets=wire.read("stored secrets", state["secrets"], wire.secrets_from_json),
            roster=wire.read("stored roster", state["roster"], wire.roster_from_json),
            held=wire.read("stored shares", state["held"], wire.held_from_json),
            request=asked,
            revealed=wire.read("stored record", state["revealed"], wire.revealed_from_json),
        )
        # What is revealed is on disk before it leaves, so a restart never forgets it.
        state["revealed"] = wire.revealed_to_json(revealed)
        _save(config, request, epoch, state)
    return SecureReply(site_id=config.site_id, payload={"answer": wire.answer_to_json(answer)})
