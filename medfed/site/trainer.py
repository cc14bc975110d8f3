"""Local DP-SGD training at one site: plan, reserve budget, train, commit, evaluate, save.

The order is the privacy contract: the ledger entry that reserves the round's steps is written
(and fsynced) before the first noisy step, and the commit with the steps actually taken is
written after the last one. A crash in between leaves the full reservation on the books, so a
crash can only over-count the privacy spent.

The network, the optimiser, the batching and the validation Dice come from small public
functions that :mod:`medfed.baselines` reuses, so that a non-private baseline differs from DP
training in privacy only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medfed.config.site import SiteConfig
from medfed.errors import TrainingError
from medfed.models.checkpoint import model_weights, unwrap
from medfed.privacy.accounting import DPSteps, compute_epsilon
from medfed.privacy.sampling import SamplingPlan, plan_sampling
from medfed.privacy.site_ledger import RoundPlan, SiteLedger
from medfed.privacy.storage import replace_file
from medfed.site.dp import (
    DPComponents,
    PoissonPatientSampler,
    check_one_example_per_patient,
    make_private,
)
from medfed.site.evaluate import Volumes, evaluate_dice
from medfed.site.release import PatientCounts

if TYPE_CHECKING:
    from medfed.data import SiteDatasets
    from medfed.models.spec import ModelSpec

log = logging.getLogger("medfed.site")


@dataclass(frozen=True)
class StepReport:
    """What a progress display needs after each step (and once more at each epoch's end).

    ``epsilon`` is the spend up to the last completed epoch (NaN before the first), recomputed
    from the ledger's history; ``patients`` is 0 in the report that closes an epoch.
    """

    step: int
    total_steps: int
    epoch: int
    patients: int
    loss: float | None
    epsilon: float


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    mean_loss: float | None
    empty_steps: int
    epsilon: float


@dataclass(frozen=True)
class TrainResult:
    """Everything one local training round produced.

    ``train_patients``/``val_patients`` are the exact counts, for the site's own records;
    ``released_train_patients``/``released_val_patients`` the noisy counts the site released
    (:mod:`medfed.site.release`), from which the sampling plan was made. ``loss_estimates``
    are the steps' noisy mean losses (one more coordinate of the DP-SGD step, see
    :class:`medfed.site.dp.LossCoordinate`), each with standard deviation ``loss_step_std``.
    ``dice_before``/``dice_after`` are exact and stay at the site (NaN when not evaluated).
    """

    run_id: str
    round: int
    site_id: str
    train_patients: int
    val_patients: int
    released_train_patients: int
    released_val_patients: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    reservation_seq: int
    epochs: list[EpochReport]
    loss_estimates: list[float]
    loss_step_std: float
    dice_before: float
    dice_after: float
    epsilon_spent: float
    epsilon_cap: float
    delta: float
    accountant: str
    seconds: float
    checkpoint: Path
    metrics_file: Path
    # The trained network's weights, for the reply to the aggregator (not part of the JSON).
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def mean_loss(self) -> float | None:
        """Mean of the round's noisy step losses (None for a round without steps)."""
        if not self.loss_estimates:
            return None
        return sum(self.loss_estimates) / len(self.loss_estimates)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            item.name: getattr(self, item.name) for item in fields(self) if item.name != "weights"
        }
        data["epochs"] = [dataclasses.asdict(epoch) for epoch in self.epochs]
        data["checkpoint"] = str(self.checkpoint)
        data["metrics_file"] = str(self.metrics_file)
        return data


def make_optimizer(*, config: SiteConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The site's optimiser over ``model``'s trainable parameters (before any DP wrapping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.training.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.training.learning_rate)
    return torch.optim.SGD(params, lr=config.training.learning_rate, momentum=0.9)


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


def collate_patients(*, items: Sequence[Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack patient items (``image``, ``label``, ``patient``) into one batch on ``device``."""
    from torch.utils.data import default_collate

    batch = default_collate(list(items))
    return {key: torch.as_tensor(value).to(device) for key, value in batch.items()}


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
) -> TrainResult:
    """Train the site's network on its own data with DP-SGD and record the privacy spent.

    ``initial_weights`` (the federation's global model) replace the seeded initialisation;
    ``proximal_mu`` adds FedProx's pull towards them to every noisy gradient. That term does
    not depend on patient data, so adding it after clipping and noise costs no privacy.
    ``planned_rounds`` is the run's plan for a federated round (its rounds are then counted
    from the ledger); ``requested_noise`` the run's noise, which may only exceed the site's.
    ``evaluate`` computes the exact validation Dice before and after, for the site itself.
    """
    from medfed.data import build_datasets
    from medfed.models import resolve_device

    started = time.monotonic()
    run_id = run_id or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    epochs = epochs or config.training.epochs
    ledger = SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )
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
    dp = make_private(
        model=model,
        num_classes=len(config.data.classes),
        optimizer=make_optimizer(config=config, model=model),
        noise_multiplier=setup.plan.noise_multiplier,
        max_grad_norm=config.privacy.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        grad_sample_mode=config.training.grad_sample_mode,
        secure_mode=config.privacy.secure_mode,
        loss_clip=config.release.loss_clip,
        loss_share=config.release.loss_share,
    )
    if proximal_mu > 0:
        if initial_weights is None:
            raise TrainingError("proximal_mu needs the global model's initial_weights")
        _add_proximal_term(dp, mu=proximal_mu)
    # Poisson sampling over the patients the site has, at the rate planned from the count it
    # released: the rate is public, and so the accountant's analysis holds as it is.
    sampler = PoissonPatientSampler(num_patients=len(datasets.train), sample_rate=plan.sample_rate)
    # Everything that can fail on bad settings has run by now; from here on steps are spent.
    reservation = ledger.reserve(plan=setup.plan, terms=config.terms)
    terms = config.terms

    def epsilon_after(steps: int) -> float:
        history = [*setup.prior, dataclasses.replace(setup.plan.dp_steps, steps=steps)]
        return compute_epsilon(history=history, delta=terms.delta, accountant=terms.accountant)

    progress = _Progress()
    try:
        reports = _train_epochs(
            dp=dp,
            dataset=datasets.train,
            sampler=sampler,
            plan=plan,
            device=device,
            progress=progress,
            epsilon_after=epsilon_after,
            on_step=on_step,
        )
    finally:
        # Commit what was actually taken, also when training stops early; only a hard crash
        # leaves the reservation uncommitted, and that counts in full.
        ledger.commit(reservation, steps=progress.steps)

    dice_after = dice()
    epsilon_spent = ledger.spent(delta=terms.delta, accountant=terms.accountant)
    checkpoint_dir = _save(config, dp, spec, run_id, round_index, dice_after, epsilon_spent)
    result = TrainResult(
        run_id=run_id,
        round=round_index,
        site_id=config.site_id,
        train_patients=len(datasets.train),
        val_patients=len(datasets.val),
        released_train_patients=setup.counts.train,
        released_val_patients=setup.counts.validation,
        sample_rate=plan.sample_rate,
        noise_multiplier=setup.plan.noise_multiplier,
        steps=progress.steps,
        reservation_seq=reservation.seq,
        epochs=reports,
        loss_estimates=list(progress.losses),
        loss_step_std=dp.loss.step_std(
            noise_multiplier=setup.plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
        ),
        dice_before=dice_before,
        dice_after=dice_after,
        epsilon_spent=epsilon_spent,
        epsilon_cap=terms.epsilon_cap,
        delta=terms.delta,
        accountant=terms.accountant,
        seconds=time.monotonic() - started,
        checkpoint=checkpoint_dir,
        metrics_file=config.paths.workdir / "metrics" / run_id / f"round-{round_index:04d}.json",
        weights=model_weights(dp.module),
    )
    _write_json(result.metrics_file, result.to_json())
    return result


@dataclass(frozen=True)
class RoundSetup:
    """A round as planned and checked, before anything of it is reserved."""

    counts: PatientCounts
    sampling: SamplingPlan
    plan: RoundPlan
    prior: tuple[DPSteps, ...]


def plan_round(
    *,
    config: SiteConfig,
    ledger: SiteLedger,
    datasets: SiteDatasets,
    run_id: str,
    round_index: int,
    planned_rounds: int | None,
    epochs: int,
    requested_noise: float | None,
) -> RoundSetup:
    """Plan one round from the released patient counts and check it: run, policy, budget.

    The run's history is checked first (it needs the ledger only); the counts are released
    when this dataset has none yet (their own small cost); then the plan, the site's ceilings
    and the cap are checked, all before the first step is reserved.
    """
    from medfed.privacy import check_budget
    from medfed.site import policy, release

    report = ledger.verify()  # a bad ledger stops the site before anything else
    if planned_rounds is not None:
        policy.check_run_history(
            config, report, run_id=run_id, round=round_index, planned_rounds=planned_rounds
        )
    counts = release.patient_counts(
        config=config,
        ledger=ledger,
        report=report,
        train_ids=[case.patient_id for case in datasets.train_cases],
        validation_ids=[case.patient_id for case in datasets.val_cases],
        run_id=run_id,
        round_index=round_index,
    )
    release.check_delta(config, counts)
    sampling = plan_sampling(
        dataset_size=counts.train, batch_size=config.training.batch_size, epochs=epochs
    )
    plan = RoundPlan(
        run_id=run_id,
        round=round_index,
        planned_rounds=planned_rounds,
        steps=sampling.steps,
        sample_rate=sampling.sample_rate,
        noise_multiplier=policy.resolve_noise(config, sampling, requested_noise),
        max_grad_norm=config.privacy.max_grad_norm,
    )
    policy.check_round(config, plan.dp_steps)
    report = ledger.verify()  # with the counts' release, when this round made it
    terms = config.terms
    # Refuse early, before any model is built; reserve() checks again under the ledger's lock.
    check_budget(
        history=report.history, planned=plan.dp_steps, cap=terms.cap, accountant=terms.accountant
    )
    return RoundSetup(counts=counts, sampling=sampling, plan=plan, prior=report.history)


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


def _add_proximal_term(dp: DPComponents, *, mu: float) -> None:
    """After noise, add ``mu * (w - w_global)`` to each gradient (FedProx's proximal term)."""
    optimizer: Any = dp.optimizer  # an Opacus DPOptimizer (typed as its torch base)
    anchors = [p.detach().clone() for p in optimizer.params]

    def hook(dp_optimizer: Any) -> None:
        for param, anchor in zip(dp_optimizer.params, anchors, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=mu)

    optimizer.attach_step_hook(hook)


@dataclass
class _Progress:
    steps: int = 0
    losses: list[float] = field(default_factory=list)


def _train_epochs(
    *,
    dp: DPComponents,
    dataset: Any,
    sampler: PoissonPatientSampler,
    plan: SamplingPlan,
    device: torch.device,
    progress: _Progress,
    epsilon_after: Callable[[int], float],
    on_step: Callable[[StepReport], None] | None,
) -> list[EpochReport]:
    reports: list[EpochReport] = []

    def notify(epoch: int, patients: int, loss: float | None) -> None:
        if on_step is not None:
            # Epsilon is recomputed at epoch ends (PRV and PLD take a while), and shown then.
            epsilon = reports[-1].epsilon if reports else math.nan
            on_step(
                StepReport(
                    step=progress.steps,
                    total_steps=plan.steps,
                    epoch=epoch,
                    patients=patients,
                    loss=loss,
                    epsilon=epsilon,
                )
            )

    with warnings.catch_warnings():
        # Opacus' backward hooks warn when the input needs no gradient, which is always so here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        dp.module.train()
        for epoch in range(1, plan.epochs + 1):
            losses: list[float] = []
            empty = 0
            for patients in sampler.steps(plan.steps_per_epoch):
                loss = _dp_step(dp, dataset, patients, device)
                progress.steps += 1
                progress.losses.append(loss)
                losses.append(loss)
                empty += not patients
                notify(epoch, len(patients), loss)
            mean_loss = sum(losses) / len(losses) if losses else None
            reports.append(
                EpochReport(
                    epoch=epoch,
                    mean_loss=mean_loss,
                    empty_steps=empty,
                    epsilon=epsilon_after(progress.steps),
                )
            )
            notify(epoch, 0, mean_loss)
            log.info(
                "epoch %d/%d loss %s epsilon %.3f",
                epoch,
                plan.epochs,
                "n/a" if mean_loss is None else f"{mean_loss:.4f}",
                reports[-1].epsilon,
            )
    return reports


def _dp_step(dp: DPComponents, dataset: Any, patients: list[int], device: torch.device) -> float:
    """One DP-SGD step over the sampled patients (possibly none); its noisy mean loss."""
    if not patients:
        return dp.step(None, None)
    batch = collate_patients(items=[dataset[index] for index in patients], device=device)
    check_one_example_per_patient(batch["patient"].tolist(), int(batch["image"].shape[0]))
    return dp.step(batch["image"], batch["label"])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(data, indent=2, default=str).encode("utf-8"))
