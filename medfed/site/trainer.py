"""Local DP-SGD training at one site: plan, reserve budget, train, commit, evaluate, save.

The order is the privacy contract: the ledger entry that reserves the round's steps is written
(and fsynced) before the first noisy step, and the commit with the steps actually taken is
written after the last one. A crash in between leaves the full reservation on the books, so a
crash can only over-count the privacy spent.

The round is planned and checked in :mod:`medfed.site.round_plan` and its steps are taken in
:mod:`medfed.site.epochs`. The network, the optimiser, the batching and the validation Dice come
from small public functions that :mod:`medfed.api.baselines` reuses, so that a non-private
baseline differs from DP training in privacy only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medfed.config.site import SiteConfig
from medfed.errors import TrainingError
from medfed.models.checkpoint import model_weights, unwrap
from medfed.privacy.accounting import compute_epsilon
from medfed.privacy.site_ledger import Reservation
from medfed.site.adaptive_clip import save_clip, with_adaptive_clipping
from medfed.site.dp import DPComponents, PoissonPatientSampler
from medfed.site.epochs import (
    EpochReport,
    Progress,
    StepReport,
    private_training,
    train_epochs,
)
from medfed.site.evaluate import Volumes, evaluate_dice
from medfed.site.ledger_of import ledger_of
from medfed.site.round_plan import plan_round
from medfed.storage import replace_file
from medfed.types import weights_digest

if TYPE_CHECKING:
    from medfed.models.spec import ModelSpec

log = logging.getLogger("medfed.site")


@dataclass(frozen=True)
class TrainResult:
    """Everything one local training round produced.

    ``train_patients``/``val_patients`` are the exact counts, for the site's own records;
    ``released_train_patients``/``released_val_patients`` the noisy counts the site released
    (:mod:`medfed.site.release`), from which the sampling plan was made. ``loss_estimates``
    are the steps' noisy mean losses (one more coordinate of the DP-SGD step, see
    :class:`medfed.site.dp.LossCoordinate`), each with standard deviation ``loss_step_std``.
    ``dice_before``/``dice_after`` are exact and stay at the site (NaN when not evaluated).
    ``reservation`` is the ledger's reservation of the round (its plan and terms); ``steps``
    the steps taken and committed.
    """

    site_id: str
    reservation: Reservation
    train_patients: int
    val_patients: int
    released_train_patients: int
    released_val_patients: int
    steps: int
    epochs: list[EpochReport]
    loss_estimates: list[float]
    loss_step_std: float
    dice_before: float
    dice_after: float
    epsilon_spent: float
    seconds: float
    checkpoint: Path
    metrics_file: Path
    # The trained network's weights, for the reply to the aggregator (not part of the JSON).
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def run_id(self) -> str:
        return self.reservation.plan.run_id

    @property
    def round(self) -> int:
        return self.reservation.plan.round

    @property
    def sample_rate(self) -> float:
        return self.reservation.plan.sample_rate

    @property
    def noise_multiplier(self) -> float:
        return self.reservation.plan.noise_multiplier

    @property
    def epsilon_cap(self) -> float:
        return self.reservation.terms.epsilon_cap

    @property
    def delta(self) -> float:
        return self.reservation.terms.delta

    @property
    def accountant(self) -> str:
        return self.reservation.terms.accountant

    @property
    def mean_loss(self) -> float | None:
        """Mean of the round's noisy step losses (None for a round without steps)."""
        if not self.loss_estimates:
            return None
        return sum(self.loss_estimates) / len(self.loss_estimates)

    def to_json(self) -> dict[str, Any]:
        """The round's metrics file: flat, the reservation as its ledger seq."""
        skip = {"weights", "reservation"}
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "round": self.round,
            "reservation_seq": self.reservation.seq,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "epsilon_cap": self.epsilon_cap,
            "delta": self.delta,
            "accountant": self.accountant,
        }
        data |= {
            item.name: getattr(self, item.name) for item in fields(self) if item.name not in skip
        }
        data["epochs"] = [dataclasses.asdict(epoch) for epoch in self.epochs]
        data["checkpoint"] = str(self.checkpoint)
        data["metrics_file"] = str(self.metrics_file)
        return data


def build_site_model(
    *,
    config: SiteConfig,
    device: torch.device,
    initial_weights: Mapping[str, np.ndarray] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """The network ``config`` describes, seeded with ``training.seed`` and placed on ``device``.

    ``initial_weights`` (a global model) replace the seeded initialisation. DP and non-private
    training both start here, so that a baseline trains exactly the network the sites train.
    """
    from medfed.models import build_model, place_model, spec_from_config
    from medfed.models.checkpoint import load_weights_into

    torch.manual_seed(config.training.seed)
    spec = spec_from_config(config)
    model = place_model(model=build_model(spec=spec), spec=spec, device=device)
    if initial_weights is not None:
        load_weights_into(model=model, weights=initial_weights)
    return model, spec


def validation_dice(
    *, model: nn.Module, config: SiteConfig, dataset: Volumes, device: torch.device
) -> float:
    """Mean foreground Dice of ``model`` on a site's validation volumes, as the site reports it."""
    return evaluate_dice(
        model=model,
        dataset=dataset,
        patch_size=config.data.patch_size,
        num_classes=len(config.data.classes),
        device=device,
    )


def train_local(
    *,
    config: SiteConfig,
    epochs: int | None = None,
    run_id: str | None = None,
    round_index: int = 0,
    planned_rounds: int | None = None,
    initial_weights: Mapping[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    requested_noise: float | None = None,
    evaluate: bool = True,
    on_step: Callable[[StepReport], None] | None = None,
    sealed_counts: bool = False,
) -> TrainResult:
    """Train the site's network on its own data with DP-SGD and record the privacy spent.

    ``initial_weights`` (the federation's global model) replace the seeded initialisation;
    ``proximal_mu`` adds FedProx's pull towards them to every noisy gradient. That term does
    not depend on patient data, so adding it after clipping and noise costs no privacy.
    ``planned_rounds`` is the run's plan for a federated round (its rounds are then counted
    from the ledger); ``requested_noise`` the run's noise, which may only exceed the site's.
    ``evaluate`` computes the exact validation Dice before and after, for the site itself.
    ``sealed_counts``: a secure-aggregation round, whose counts the aggregator must not read
    (:func:`medfed.site.round_plan.plan_round`).
    """
    from medfed.data import build_datasets
    from medfed.models import resolve_device

    started = time.monotonic()
    run_id = run_id or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    epochs = epochs or config.training.epochs
    ledger = ledger_of(config)
    datasets = build_datasets(config)
    setup = plan_round(
        config=config,
        ledger=ledger,
        datasets=datasets,
        run_id=run_id,
        round_index=round_index,
        planned_rounds=planned_rounds,
        epochs=epochs,
        requested_noise=requested_noise,
        sealed_counts=sealed_counts,
    )
    setup = with_adaptive_clipping(
        config=config, setup=setup, run_id=run_id, round_index=round_index
    )
    plan = setup.sampling
    # a different crop sequence each round, reproducible for a given seed
    datasets.train.set_random_state(config.training.seed + round_index)
    device = resolve_device(name=config.training.device, threads=config.training.threads)
    model, spec = build_site_model(config=config, device=device, initial_weights=initial_weights)

    def dice() -> float:
        if not evaluate:
            return math.nan
        return validation_dice(model=model, config=config, dataset=datasets.val, device=device)

    dice_before = dice()
    if proximal_mu > 0 and initial_weights is None:
        raise TrainingError("proximal_mu needs the global model's initial_weights")
    dp = private_training(
        config=config,
        model=model,
        setup=setup,
        proximal_mu=proximal_mu,
        augmentation_multiplicity=config.training.augmentation_multiplicity,
    )
    # Poisson sampling over the patients the site has, at the rate planned from the count it
    # released: the rate is public, and so the accountant's analysis holds as it is.
    sampler = PoissonPatientSampler(num_patients=len(datasets.train), sample_rate=plan.sample_rate)
    # Everything that can fail on bad settings has run by now; from here on steps are spent.
    reservation = ledger.reserve(plan=setup.plan, terms=config.terms)
    terms = config.terms

    def epsilon_after(steps: int) -> float:
        history = [*setup.prior, dataclasses.replace(setup.plan.dp_steps, steps=steps)]
        return compute_epsilon(history=history, delta=terms.delta, accountant=terms.accountant)

    progress = Progress()
    try:
        reports = train_epochs(
            dp=dp,
            dataset=datasets.train,
            sampler=sampler,
            plan=plan,
            device=device,
            progress=progress,
            epsilon_after=epsilon_after,
            on_step=on_step,
        )
    except BaseException:
        # Commit what was actually taken, also when training stops early; only a hard crash
        # leaves the reservation uncommitted, and that counts in full.
        ledger.commit(reservation, steps=progress.steps)
        raise
    # The commit names the model trained from and the exact arrays returned (and sent), so
    # that an auditor can walk from a global model back to this entry.
    weights = model_weights(dp.module)
    ledger.commit(
        reservation,
        steps=progress.steps,
        model_sha256=None if initial_weights is None else weights_digest(initial_weights),
        update_sha256=weights_digest(weights),
    )
    if dp.adaptive is not None:
        save_clip(
            workdir=config.paths.workdir,
            run_id=run_id,
            round_index=round_index,
            clip=dp.adaptive.clip,
        )
        log.info("adaptive clipping: the round ends at clip %.4g", dp.adaptive.clip)

    dice_after = dice()
    epsilon_spent = ledger.spent(delta=terms.delta, accountant=terms.accountant)
    checkpoint_dir = _save(config, dp, spec, run_id, round_index, dice_after, epsilon_spent)
    result = TrainResult(
        site_id=config.site_id,
        reservation=reservation,
        train_patients=len(datasets.train),
        val_patients=len(datasets.val),
        released_train_patients=setup.counts.train,
        released_val_patients=setup.counts.validation,
        steps=progress.steps,
        epochs=reports,
        loss_estimates=list(progress.losses),
        loss_step_std=dp.loss.step_std(
            noise_multiplier=dp.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
        ),
        dice_before=dice_before,
        dice_after=dice_after,
        epsilon_spent=epsilon_spent,
        seconds=time.monotonic() - started,
        checkpoint=checkpoint_dir,
        metrics_file=config.paths.workdir / "metrics" / run_id / f"round-{round_index:04d}.json",
        weights=weights,
    )
    _write_json(result.metrics_file, result.to_json())
    return result


def _save(
    config: SiteConfig,
    dp: DPComponents,
    spec: ModelSpec,
    run_id: str,
    round_index: int,
    dice: float,
    epsilon_spent: float,
) -> Path:
    from medfed.models import save_checkpoint

    checkpoint_dir = config.paths.workdir / "checkpoints" / run_id
    save_checkpoint(
        directory=checkpoint_dir,
        model=unwrap(dp.module),
        spec=spec,
        metadata={
            "site_id": config.site_id,
            "run_id": run_id,
            "round": round_index,
            "dice": dice,
            "epsilon_spent": epsilon_spent,
            "delta": config.privacy.delta,
        },
    )
    return checkpoint_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(data, indent=2, default=str).encode("utf-8"))
