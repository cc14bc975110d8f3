"""A site's part in a federation run, free of Flower: init, train and evaluate one round.

The ClientApp (:mod:`medfed.site.clientapp`) only converts messages; everything a site decides
happens here, in this order: the run's settings are checked against the site's policy before
any data is read (:mod:`medfed.site.policy`); training goes through
:func:`medfed.site.trainer.train_local`, which writes the ledger before and after; every number
that leaves is released through :mod:`medfed.site.release` into the ledger; the reply carries
the weights and the ledger entries the aggregator has not seen, nothing else.

A round asked for twice (the aggregator restarted and resumed) is answered from the stored
reply instead of training again, as long as the global model is the same: the steps were
spent once and are not spent twice. A second, different model for a round already answered
is refused.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from medfed.config.site import ModelSection, SiteConfig
from medfed.envelope import EvaluationReply, InitReply, RoundReply, RoundRequest
from medfed.errors import (
    ConfigError,
    EnvelopeError,
    LedgerError,
    ModelError,
    PolicyError,
    RunSettingsError,
)
from medfed.site import policy
from medfed.types import weights_digest

if TYPE_CHECKING:
    from medfed.site.release import DiceOutcome, PatientCounts
    from medfed.site.trainer import TrainResult

log = logging.getLogger("medfed.site")

_REPLY_FILE = "reply.json"


def check_policy(config: SiteConfig, request: RoundRequest) -> None:
    """Refuse a round whose settings break the site's policy; every broken rule is named.

    Runs before any data is read. The network size rule builds the requested network (on
    PyTorch's meta device where it can) to count its trainable parameters; limits that need
    the round's sampling plan are checked by the trainer, still before any step is taken.
    """
    run = _run_request(config, request)
    problems = policy.request_problems(config, run)
    limit = config.policy.max_parameters
    if limit is not None:
        try:
            count = trainable_parameters(_apply(config, request))
        except ConfigError as exc:
            if not problems:
                raise
            problems.append(exc.message)
        else:
            if count > limit:
                problems.append(
                    f"the network has {count:,} trainable parameters, more than "
                    f"policy.max_parameters {limit:,}"
                )
    policy.refuse(config, run, problems)


def _run_request(config: SiteConfig, request: RoundRequest) -> policy.RunRequest:
    return policy.RunRequest(
        run_name=request.run_name,
        project=request.project,
        round=request.round,
        planned_rounds=request.planned_rounds,
        network=str(request.model.get("network", config.model.network)),
        local_epochs=request.local_epochs,
        noise_multiplier=request.noise_multiplier,
    )


def trainable_parameters(config: SiteConfig) -> int:
    """Trainable parameters of the network ``config`` describes (built, never trained)."""
    import torch

    from medfed.models import build_model, spec_from_config

    spec = spec_from_config(config)
    try:
        # No memory and no random numbers for the weights: only the shapes are needed.
        with torch.device("meta"):
            model = build_model(spec=spec)
    except Exception:  # a layer that cannot be built on the meta device: build it for real
        with torch.random.fork_rng(devices=[]):
            model = build_model(spec=spec)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def round_config(config: SiteConfig, request: RoundRequest) -> SiteConfig:
    """The site's configuration with the run's model and training settings applied.

    The run is checked against the site's policy first (:func:`check_policy`), so no caller
    can apply settings the site has not agreed to. The result is re-validated as a whole, so
    a run's model that does not fit the site's patch size is a clear error and not a shape
    error deep in a network. The privacy section stays the site's: the run's noise is
    passed to the trainer, which may only raise the site's own
    (:func:`medfed.site.policy.resolve_noise`).
    """
    check_policy(config, request)
    return _apply(config, request)


def _apply(config: SiteConfig, request: RoundRequest) -> SiteConfig:
    data = config.model_dump()
    try:
        data["model"] = ModelSection.model_validate(request.model).model_dump()
    except ValidationError as exc:
        raise RunSettingsError(f"the run's model settings are invalid: {_problems(exc)}") from None
    data["training"]["epochs"] = request.local_epochs
    if request.learning_rate is not None:
        data["training"]["learning_rate"] = request.learning_rate
    if request.max_grad_norm is not None:
        data["privacy"]["max_grad_norm"] = request.max_grad_norm
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise RunSettingsError(
            f"the run's settings do not fit site {config.site_id}: {_problems(exc)}",
            hint="the run's model must fit the site's data.patch_size",
        ) from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
    )


def initial_model(*, config: SiteConfig, request: RoundRequest) -> InitReply:
    """A freshly seeded network for the run: the federation's starting global model."""
    import torch

    from medfed.models import build_model, spec_from_config
    from medfed.models.checkpoint import model_weights

    effective = round_config(config, request)
    spec = spec_from_config(effective)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.seed)
        model = build_model(spec=spec)
    return InitReply(site_id=config.site_id, weights=model_weights(model), spec=spec.to_dict())


def train_round(*, config: SiteConfig, request: RoundRequest) -> RoundReply:
    """Train one round from the global model, or replay a round already trained."""
    effective = round_config(config, request)
    if request.weights is None:
        raise ConfigError(f"round {request.round} of {request.run_name!r} came without a model")
    if request.round < 1:
        raise PolicyError(
            f"site {config.site_id} declines run {request.run_name!r}: training rounds are "
            f"numbered from 1, not {request.round}",
            hint="rounds 1 to planned_rounds train; round 0 is the initial model",
        )
    refuse_plain_in_secure_run(effective, request)
    check_against_aggregator(effective, request)
    digest = weights_digest(request.weights)
    from medfed.storage import locked, make_private_dirs

    directory = _reply_dir(effective, request)
    make_private_dirs(directory)
    # One training per run and round at a time: a repeated request (the aggregator restarted
    # while this site trained) waits here and then replays the stored reply.
    with locked(directory / "round", exclusive=True):
        weights = _stored_reply(effective, request, digest)
        if weights is not None:
            log.info(
                "round %d of %s was trained already: replaying it", request.round, request.run_name
            )
        else:
            started = time.monotonic()
            weights = _train(effective, request, digest)
            _store_reply(effective, request, digest, weights, time.monotonic() - started)
    return _reply(effective, request, weights)


def train_from_request(
    config: SiteConfig, request: RoundRequest, *, sealed_counts: bool = False
) -> TrainResult:
    """DP-SGD training for a round as the request asks it, from its global model (no Dice
    computed: what the site releases about the round is the caller's to decide).
    ``sealed_counts``: a secure round, whose released counts stay at the site."""
    from medfed.site.trainer import train_local

    assert request.weights is not None
    return train_local(
        config=config,
        run_id=request.run_name,
        round_index=request.round,
        planned_rounds=request.planned_rounds,
        initial_weights=request.weights,
        proximal_mu=request.proximal_mu,
        requested_noise=request.noise_multiplier,
        evaluate=False,
        sealed_counts=sealed_counts,
    )


def _train(config: SiteConfig, request: RoundRequest, digest: str) -> Mapping[str, np.ndarray]:
    from medfed.site import release

    assert request.weights is not None
    result = train_from_request(config, request)
    ledger = _ledger(config)
    release.training_loss(
        config=config,
        ledger=ledger,
        run_id=request.run_name,
        round=request.round,
        reservation_seq=result.reservation.seq,
        estimates=result.loss_estimates,
        step_std=result.loss_step_std,
        noise_multiplier=result.noise_multiplier,
        model_sha256=digest,
    )
    release_dice(config, request, request.weights, digest, final=False)
    return result.weights


def evaluate_round(*, config: SiteConfig, request: RoundRequest) -> EvaluationReply:
    """Release the Dice of a model of a run this site trained in, on its validation split.

    Only a run in the site's own ledger is evaluated, each model of it once (asked again, the
    same release is sent again), within the release policy's limit per run.
    """
    effective = round_config(config, request)
    if request.weights is None:
        raise ConfigError(f"evaluation of {request.run_name!r} came without a model")
    refuse_plain_in_secure_run(effective, request)
    check_against_aggregator(effective, request)
    require_trained_in(effective, request.run_name)
    release_dice(effective, request, request.weights, weights_digest(request.weights), final=True)
    first, lines = ledger_lines_since(effective, request.ledger_known)
    return EvaluationReply(site_id=config.site_id, ledger_first_seq=first, ledger_lines=lines)


def require_trained_in(config: SiteConfig, run_id: str) -> None:
    """Refuse to evaluate a model of a run the site's ledger holds no round of."""
    if not _ledger(config).verify().runs(run_id):
        raise PolicyError(
            f"site {config.site_id} evaluates models of the runs it trained in only, and has "
            f"no round of run {run_id!r}",
            hint="evaluate a run's final model after the site took part in its rounds",
        )


def refuse_plain_in_secure_run(config: SiteConfig, request: RoundRequest) -> None:
    """A run this site took part in under secure aggregation gets no plain round and no plain
    evaluation: its updates, counts and Dice leave only inside masked sums."""
    from medfed.site.secure_round import state_dir

    if state_dir(config, request.run_name).is_dir():
        raise PolicyError(
            f"site {config.site_id} takes part in run {request.run_name!r} under secure "
            "aggregation: it answers its rounds and its evaluation only as masked sums",
            hint="keep secure_aggregation on for the whole run, or start a new run",
        )


def release_dice(
    config: SiteConfig,
    request: RoundRequest,
    weights: Mapping[str, np.ndarray],
    digest: str,
    *,
    final: bool,
    sealed: bool = False,
) -> tuple[DiceOutcome, PatientCounts]:
    """The validation Dice of ``weights``, released as the site's release policy allows, and
    the released counts it is averaged with; ``sealed``: under secure aggregation, both stay at
    the site."""
    from medfed.data import build_datasets
    from medfed.site import release

    datasets = build_datasets(config)
    counts = release.released_counts(
        config=config,
        run_id=request.run_name,
        round_index=request.round,
        datasets=datasets,
        sealed=sealed,
    )
    outcome = release.validation_dice(
        config=config,
        ledger=_ledger(config),
        counts=counts,
        run_id=request.run_name,
        round=request.round,
        planned_rounds=request.planned_rounds,
        final=final,
        model_sha256=digest,
        per_patient=lambda: _per_patient_dice(config, weights, datasets.val),
        sealed=sealed,
    )
    if outcome.withheld:
        log.info(
            "site %s releases no Dice for round %d of %s: %s",
            config.site_id,
            request.round,
            request.run_name,
            outcome.withheld,
        )
    return outcome, counts


def _per_patient_dice(
    config: SiteConfig, weights: Mapping[str, np.ndarray], dataset: Any
) -> Sequence[float]:
    import torch

    from medfed.models import build_model, place_model, resolve_device, spec_from_config
    from medfed.models.checkpoint import load_weights_into
    from medfed.site.evaluate import per_patient_dice

    device = resolve_device(name=config.training.device, threads=config.training.threads)
    spec = spec_from_config(config)
    with torch.random.fork_rng(devices=[]):
        model = place_model(model=build_model(spec=spec), spec=spec, device=device)
    load_weights_into(model=model, weights=weights)
    return per_patient_dice(
        model=model,
        dataset=dataset,
        patch_size=config.data.patch_size,
        num_classes=len(config.data.classes),
        device=device,
    )


def _ledger(config: SiteConfig) -> Any:
    from medfed.site.ledger_of import ledger_of

    return ledger_of(config)


def check_against_aggregator(config: SiteConfig, request: RoundRequest) -> None:
    """Before anything is reserved: refuse a ledger that holds less than the aggregator has.

    The aggregator's signed receipt, when the site can check it, is verified against the
    ledger and kept (:meth:`SiteLedger.accept_receipt`); the plain count it sends is checked
    either way.
    """
    ledger = _ledger(config)
    if request.ledger_receipt is not None:
        if ledger.receipts is None:
            log.info(
                "site %s has no receipt key: the aggregator's ledger receipt is not checked",
                config.site_id,
            )
        else:
            receipt = ledger.accept_receipt(request.ledger_receipt)
            if receipt.count != request.ledger_known:
                raise EnvelopeError(
                    f"the aggregator's receipt covers {receipt.count} ledger entries but the "
                    f"request says it holds {request.ledger_known}"
                )
    _check_known(config, request.ledger_known, len(ledger.verify().entries))


def _check_known(config: SiteConfig, known: int, count: int) -> None:
    if known > count:
        raise LedgerError(
            f"the aggregator holds {known} entries of site {config.site_id}'s ledger but the "
            f"site has {count}: the ledger was rolled back or replaced",
            hint="restore the newest backup of the ledger and its .head file; never start a "
            "site's ledger afresh",
        )


def ledger_lines_since(config: SiteConfig, known: int) -> tuple[int, tuple[str, ...]]:
    """The verified ledger's entries from index ``known`` on (what the aggregator lacks)."""
    report = _ledger(config).verify()
    count = len(report.entries)
    _check_known(config, known, count)
    if count == 0:
        return known, ()
    lines = config.ledger_path.read_bytes().decode("utf-8").split("\n")[:count]
    return known, tuple(lines[known:])


def _reply(
    config: SiteConfig, request: RoundRequest, weights: Mapping[str, np.ndarray]
) -> RoundReply:
    first, lines = ledger_lines_since(config, request.ledger_known)
    return RoundReply(
        site_id=config.site_id,
        round=request.round,
        weights=weights,
        ledger_first_seq=first,
        ledger_lines=lines,
    )


def _reply_dir(config: SiteConfig, request: RoundRequest) -> Path:
    return config.paths.workdir / "federation" / request.run_name / f"round-{request.round:04d}"


def _store_reply(
    config: SiteConfig,
    request: RoundRequest,
    digest: str,
    weights: Mapping[str, np.ndarray],
    seconds: float,
) -> None:
    """The round's update, for a replay; ``seconds`` of the site's work stay here too (the
    site's own record, never sent)."""
    from medfed.model_files import write_arrays
    from medfed.storage import replace_file

    directory = _reply_dir(config, request)
    # Atomic and fsynced like the reply file: a node stopped mid-write leaves the old file or
    # none, and the round is trained again instead of replayed from a torn update.
    write_arrays(directory / "update.safetensors", weights, mode=0o600)
    record = {
        "global_sha256": digest,
        "update_sha256": weights_digest(weights),
        "site_seconds": round(seconds, 3),
    }
    # The reply file is written last: its presence means the update beside it is complete.
    replace_file(directory / _REPLY_FILE, json.dumps(record, indent=2).encode("utf-8"))


def _stored_reply(
    config: SiteConfig, request: RoundRequest, digest: str
) -> Mapping[str, np.ndarray] | None:
    """The stored update of this round for this global model; refuses another model."""
    from medfed.model_files import read_arrays

    directory = _reply_dir(config, request)
    try:
        record = json.loads((directory / _REPLY_FILE).read_text(encoding="utf-8"))
        weights = read_arrays(directory / "update.safetensors")
    except (OSError, ValueError, ModelError):
        return None
    if record.get("update_sha256") != weights_digest(weights):
        return None  # a torn or damaged store: the round was never answered from it
    if record.get("global_sha256") != digest:
        raise PolicyError(
            f"site {config.site_id} answered round {request.round} of run "
            f"{request.run_name!r} already, for another global model",
            hint="a round is trained once; resume the run from its last global model",
        )
    return weights
