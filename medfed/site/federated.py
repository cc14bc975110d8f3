"""A site's part in a federation run, free of Flower: init, train and evaluate one round.

The ClientApp (:mod:`medfed.site.clientapp`) only converts messages; everything a site decides
happens here, in this order: the run's settings are checked against the site's policy before
any data is read; training goes through :func:`medfed.site.trainer.train_local`, which writes
the ledger before and after; the reply carries the ledger entries the aggregator has not seen.

A round asked for twice (the aggregator restarted and resumed) is answered from the stored
reply instead of training again, as long as the global model is the same: the steps were
spent once and are not spent twice.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from medfed.config.run import RUN_NAME_PATTERN
from medfed.config.site import ModelSection, SiteConfig
from medfed.errors import ConfigError, LedgerError, PolicyError
from medfed.transport.envelope import (
    EvaluationReply,
    InitReply,
    RoundReply,
    RoundRequest,
)
from medfed.types import SiteUpdate

log = logging.getLogger("medfed.site")

_REPLY_FILE = "reply.json"


def check_policy(config: SiteConfig, request: RoundRequest) -> None:
    """Refuse a round whose settings break the site's policy; every broken rule is named.

    Runs before any data is read. The network size rule builds the requested network (on
    PyTorch's meta device where it can) to count its trainable parameters; limits that need
    the round's sampling plan (noise from a per-round epsilon target, the epsilon of one
    round) are checked by the trainer, still before any step is taken.
    """
    problems = _rule_problems(config, request)
    if config.policy.max_parameters is not None:
        try:
            count = trainable_parameters(_apply(config, request))
        except ConfigError as exc:
            if not problems:
                raise
            problems.append(exc.message)
        else:
            if count > config.policy.max_parameters:
                problems.append(
                    f"the network has {count:,} trainable parameters, more than "
                    f"policy.max_parameters {config.policy.max_parameters:,}"
                )
    if problems:
        log.warning(
            "site %s declines run %r: %s",
            config.site_id,
            request.run_name,
            "; ".join(problems),
            extra={"run_id": request.run_name, "round": request.round, "site_id": config.site_id},
        )
        raise PolicyError(
            f"site {config.site_id} declines run {request.run_name!r}: " + "; ".join(problems),
            hint="change the run settings, or the site's policy section if the site agrees",
        )


def _rule_problems(config: SiteConfig, request: RoundRequest) -> list[str]:
    """The broken rules that need nothing but the request and the policy."""
    policy = config.policy
    problems: list[str] = []
    network = request.model.get("network", config.model.network)
    if network not in policy.allowed_networks:
        problems.append(
            f"network {network!r} is not in policy.allowed_networks {policy.allowed_networks}"
        )
    if request.local_epochs > policy.max_local_epochs:
        problems.append(
            f"{request.local_epochs} local epochs exceed policy.max_local_epochs "
            f"{policy.max_local_epochs}"
        )
    noise = request.noise_multiplier
    if (
        noise is not None
        and policy.min_noise_multiplier is not None
        and noise < policy.min_noise_multiplier
    ):
        problems.append(
            f"noise multiplier {noise:g} is below policy.min_noise_multiplier "
            f"{policy.min_noise_multiplier:g}"
        )
    if policy.max_rounds_per_run is not None and request.planned_rounds > policy.max_rounds_per_run:
        problems.append(
            f"the run plans {request.planned_rounds} rounds, more than "
            f"policy.max_rounds_per_run {policy.max_rounds_per_run}"
        )
    problems += _name_problems("run name", request.run_name, "accepted_runs", policy.accepted_runs)
    problems += _name_problems(
        "project", request.project, "accepted_projects", policy.accepted_projects
    )
    return problems


def _name_problems(what: str, name: str, rule: str, patterns: list[str]) -> list[str]:
    """A run's or project's name: valid, and matching one of the policy's globs."""
    if not RUN_NAME_PATTERN.match(name):
        return [f"{what} {name!r} is not a valid name"]
    # Case-sensitive on every platform: run and project names are identifiers.
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
        return [f"{what} {name!r} matches none of policy.{rule} {patterns}"]
    return []


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
    a run's model that does not fit the site's patch size is a clear :class:`ConfigError` and
    not a shape error deep in a network.
    """
    check_policy(config, request)
    return _apply(config, request)


def _apply(config: SiteConfig, request: RoundRequest) -> SiteConfig:
    data = config.model_dump()
    try:
        data["model"] = ModelSection.model_validate(request.model).model_dump()
    except ValidationError as exc:
        raise ConfigError(f"the run's model settings are invalid: {_problems(exc)}") from None
    data["training"]["epochs"] = request.local_epochs
    if request.learning_rate is not None:
        data["training"]["learning_rate"] = request.learning_rate
    if request.noise_multiplier is not None:
        data["privacy"]["noise_multiplier"] = request.noise_multiplier
        data["privacy"]["target_epsilon_per_round"] = None
    if request.max_grad_norm is not None:
        data["privacy"]["max_grad_norm"] = request.max_grad_norm
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"the run's settings do not fit site {config.site_id}: {_problems(exc)}",
            hint="the run's model must fit the site's data.patch_size",
        ) from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
    )


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies one global model exactly."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    digest = weights_digest(request.weights)
    from medfed.privacy.storage import locked, make_private_dirs

    directory = _reply_dir(effective, request)
    make_private_dirs(directory)
    # One training per run and round at a time: a repeated request (the aggregator restarted
    # while this site trained) waits here and then replays the stored reply.
    with locked(directory / "round", exclusive=True):
        update = _stored_reply(effective, request, digest)
        if update is not None:
            log.info(
                "round %d of %s was trained already: replaying it", request.round, request.run_name
            )
        else:
            update = _train(effective, request, digest)
    return _with_ledger(effective, update, request.ledger_known)


def _train(config: SiteConfig, request: RoundRequest, digest: str) -> SiteUpdate:
    from medfed.site.trainer import train_local

    assert request.weights is not None
    result = train_local(
        config=config,
        run_id=request.run_name,
        round_index=request.round,
        initial_weights=request.weights,
        proximal_mu=request.proximal_mu,
    )
    loss = result.mean_loss
    update = SiteUpdate(
        site_id=config.site_id,
        round=request.round,
        weights=result.weights,
        num_patients=result.train_patients,
        metrics={
            "loss": float("nan") if loss is None else loss,
            "dice_before": result.dice_before,
            "dice_after": result.dice_after,
            "epsilon_spent": result.epsilon_spent,
            "steps": float(result.steps),
            "sample_rate": result.sample_rate,
            "noise_multiplier": result.noise_multiplier,
            "train_seconds": result.seconds,
            "val_patients": float(result.val_patients),
        },
    )
    _store_reply(config, request, digest, update)
    return update


def evaluate_round(*, config: SiteConfig, request: RoundRequest) -> EvaluationReply:
    """Dice of the global model on this site's validation split."""
    import torch

    from medfed.data import build_datasets
    from medfed.models import build_model, place_model, resolve_device, spec_from_config
    from medfed.models.checkpoint import load_weights_into
    from medfed.site.evaluate import evaluate_dice

    effective = round_config(config, request)
    if request.weights is None:
        raise ConfigError(f"evaluation of {request.run_name!r} came without a model")
    device = resolve_device(name=effective.training.device, threads=effective.training.threads)
    spec = spec_from_config(effective)
    with torch.random.fork_rng(devices=[]):
        model = place_model(model=build_model(spec=spec), spec=spec, device=device)
    load_weights_into(model=model, weights=request.weights)
    datasets = build_datasets(effective)
    dice = evaluate_dice(
        model=model,
        dataset=datasets.val,
        patch_size=effective.data.patch_size,
        num_classes=len(effective.data.classes),
        device=device,
    )
    return EvaluationReply(site_id=config.site_id, dice=dice, val_patients=len(datasets.val))


def ledger_lines_since(config: SiteConfig, known: int) -> tuple[int, tuple[str, ...]]:
    """The verified ledger's entries from index ``known`` on (what the aggregator lacks)."""
    from medfed.privacy import SiteLedger

    ledger = SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )
    report = ledger.verify()
    count = len(report.entries)
    if known > count:
        raise LedgerError(
            f"the aggregator holds {known} entries of site {config.site_id}'s ledger but the "
            f"site has {count}: the ledger was rolled back or replaced",
            hint="restore the newest backup of the ledger and its .head file; never start a "
            "site's ledger afresh",
        )
    if count == 0:
        return known, ()
    lines = config.ledger_path.read_bytes().decode("utf-8").split("\n")[:count]
    return known, tuple(lines[known:])


def _with_ledger(config: SiteConfig, update: SiteUpdate, known: int) -> RoundReply:
    first, lines = ledger_lines_since(config, known)
    return RoundReply(
        update=update,
        ledger_first_seq=first,
        ledger_lines=lines,
        epsilon_cap=config.privacy.epsilon_cap,
        delta=config.privacy.delta,
        accountant=config.privacy.accountant,
    )


def _reply_dir(config: SiteConfig, request: RoundRequest) -> Path:
    return config.paths.workdir / "federation" / request.run_name / f"round-{request.round:04d}"


def _store_reply(
    config: SiteConfig, request: RoundRequest, digest: str, update: SiteUpdate
) -> None:
    from safetensors.numpy import save

    from medfed.privacy.storage import replace_file

    directory = _reply_dir(config, request)
    weights = {name: np.ascontiguousarray(array) for name, array in update.weights.items()}
    # Atomic and fsynced like the reply file: a node stopped mid-write leaves the old file or
    # none, and the round is trained again instead of replayed from a torn update.
    replace_file(directory / "update.safetensors", save(weights), mode=0o600)
    record: dict[str, Any] = {
        "global_sha256": digest,
        "update_sha256": weights_digest(update.weights),
        "num_patients": update.num_patients,
        "metrics": dict(update.metrics),
    }
    # The reply file is written last: its presence means the update beside it is complete.
    replace_file(directory / _REPLY_FILE, json.dumps(record, indent=2).encode("utf-8"))


def _stored_reply(config: SiteConfig, request: RoundRequest, digest: str) -> SiteUpdate | None:
    from safetensors.numpy import load_file

    directory = _reply_dir(config, request)
    try:
        record = json.loads((directory / _REPLY_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(directory / "update.safetensors"))
    except (OSError, ValueError):
        return None
    if record.get("global_sha256") != digest or record.get("update_sha256") != weights_digest(
        weights
    ):
        return None
    return SiteUpdate(
        site_id=config.site_id,
        round=request.round,
        weights=weights,
        num_patients=int(record["num_patients"]),
        metrics={key: float(value) for key, value in record["metrics"].items()},
    )
