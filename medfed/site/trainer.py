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
from medfed.errors import PolicyError, PrivacyUnitError, TrainingError
from medfed.models.checkpoint import unwrap
from medfed.privacy.sampling import SamplingPlan, plan_sampling
from medfed.privacy.site_ledger import RoundPlan
from medfed.privacy.storage import replace_file
from medfed.site.dp import (
    DPComponents,
    PoissonPatientSampler,
    check_one_example_per_patient,
    make_private,
    per_sample_gradient_rows,
    prepare_empty_step,
)
from medfed.site.evaluate import Volumes, evaluate_dice

if TYPE_CHECKING:
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
    """Everything one local training round produced."""

    run_id: str
    round: int
    site_id: str
    train_patients: int
    val_patients: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    epochs: list[EpochReport]
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
        """Mean training loss of the last epoch that had a non-empty step."""
        losses = [epoch.mean_loss for epoch in self.epochs if epoch.mean_loss is not None]
        return losses[-1] if losses else None

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


def _noise_multiplier(config: SiteConfig, plan: SamplingPlan) -> float:
    privacy = config.privacy
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    from medfed.privacy import noise_for_target_epsilon

    assert privacy.target_epsilon_per_round is not None
    return noise_for_target_epsilon(
        target_epsilon=privacy.target_epsilon_per_round,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


def _check_round_policy(config: SiteConfig, plan: RoundPlan) -> None:
    """The site policy's limits that need the round's plan (noise, epsilon of this round)."""
    from medfed.privacy import compute_epsilon

    policy, privacy = config.policy, config.privacy
    if (
        policy.min_noise_multiplier is not None
        and plan.noise_multiplier < policy.min_noise_multiplier
    ):
        raise PolicyError(
            f"noise multiplier {plan.noise_multiplier:.4g} is below the site policy's "
            f"min_noise_multiplier {policy.min_noise_multiplier:g}",
            hint="ask for more noise in the run settings, or change policy.min_noise_multiplier",
        )
    if policy.max_epsilon_per_round is not None:
        alone = compute_epsilon(
            history=[plan.dp_steps], delta=privacy.delta, accountant=privacy.accountant
        )
        if alone > policy.max_epsilon_per_round:
            raise PolicyError(
                f"this round alone would spend epsilon {alone:.3f}, above the site policy's "
                f"max_epsilon_per_round {policy.max_epsilon_per_round:g}",
                hint="fewer local epochs or more noise in the run settings",
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
    initial_weights: Mapping[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train the site's network on its own data with DP-SGD and record the privacy spent.

    ``initial_weights`` (the federation's global model) replace the seeded initialisation;
    ``proximal_mu`` adds FedProx's pull towards them to every noisy gradient. That term does
    not depend on patient data, so adding it after clipping and noise costs no privacy.
    """
    from medfed.data import build_datasets
    from medfed.models import resolve_device, save_checkpoint
    from medfed.models.checkpoint import model_weights
    from medfed.privacy import (
        BudgetCap,
        SiteLedger,
        check_budget,
        compute_epsilon,
    )

    started = time.monotonic()
    run_id = run_id or f"local-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    epochs = epochs or config.training.epochs
    privacy = config.privacy

    ledger = SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )
    prior = ledger.history()  # verifies the whole ledger first: a bad ledger stops the site

    datasets = build_datasets(config)
    # a different crop sequence each round, reproducible for a given seed
    datasets.train.set_random_state(config.training.seed + round_index)
    plan = plan_sampling(
        dataset_size=len(datasets.train), batch_size=config.training.batch_size, epochs=epochs
    )
    noise = _noise_multiplier(config, plan)
    round_plan = RoundPlan(
        run_id=run_id,
        round=round_index,
        steps=plan.steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=noise,
        max_grad_norm=privacy.max_grad_norm,
        delta=privacy.delta,
        dataset_size=plan.dataset_size,
        accountant=privacy.accountant,
    )
    _check_round_policy(config, round_plan)
    cap = BudgetCap(epsilon=privacy.epsilon_cap, delta=privacy.delta)
    # Refuse early, before any model is built; reserve() checks again under the ledger's lock.
    check_budget(history=prior, planned=round_plan.dp_steps, cap=cap, accountant=privacy.accountant)

    device = resolve_device(name=config.training.device, threads=config.training.threads)
    model, spec = build_site_model(config=config, device=device, initial_weights=initial_weights)

    def dice() -> float:
        return validation_dice(model=model, config=config, dataset=datasets.val, device=device)

    dice_before = dice()
    dp = make_private(
        model=model,
        num_classes=len(config.data.classes),
        optimizer=make_optimizer(config=config, model=model),
        noise_multiplier=noise,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        grad_sample_mode=config.training.grad_sample_mode,
        secure_mode=privacy.secure_mode,
    )
    if proximal_mu > 0:
        if initial_weights is None:
            raise TrainingError("proximal_mu needs the global model's initial_weights")
        _add_proximal_term(dp, mu=proximal_mu)
    sampler = PoissonPatientSampler(
        num_patients=plan.dataset_size, sample_rate=plan.sample_rate, secure=privacy.secure_mode
    )
    # Everything that can fail on bad settings has run by now; from here on steps are spent.
    reservation = ledger.reserve(plan=round_plan, cap=cap)

    def epsilon_after(steps: int) -> float:
        history = [*prior, dataclasses.replace(round_plan.dp_steps, steps=steps)]
        return compute_epsilon(history=history, delta=privacy.delta, accountant=privacy.accountant)

    taken = _StepCounter()
    try:
        reports = _train_epochs(
            dp=dp,
            dataset=datasets.train,
            sampler=sampler,
            plan=plan,
            device=device,
            taken=taken,
            epsilon_after=epsilon_after,
            on_step=on_step,
        )
    finally:
        # Commit what was actually taken, also when training stops early; only a hard crash
        # leaves the reservation uncommitted, and that counts in full.
        ledger.commit(reservation, steps=taken.steps)
    steps_done = taken.steps

    dice_after = dice()
    epsilon_spent = ledger.spent(delta=privacy.delta, accountant=privacy.accountant)
    checkpoint_dir = config.paths.workdir / "checkpoints" / run_id
    save_checkpoint(
        directory=checkpoint_dir,
        model=unwrap(dp.module),
        spec=spec,
        metadata={
            "site_id": config.site_id,
            "run_id": run_id,
            "round": round_index,
            "dice": dice_after,
            "epsilon_spent": epsilon_spent,
            "delta": privacy.delta,
        },
    )
    result = TrainResult(
        run_id=run_id,
        round=round_index,
        site_id=config.site_id,
        train_patients=len(datasets.train),
        val_patients=len(datasets.val),
        sample_rate=plan.sample_rate,
        noise_multiplier=noise,
        steps=steps_done,
        epochs=reports,
        dice_before=dice_before,
        dice_after=dice_after,
        epsilon_spent=epsilon_spent,
        epsilon_cap=privacy.epsilon_cap,
        delta=privacy.delta,
        accountant=privacy.accountant,
        seconds=time.monotonic() - started,
        checkpoint=checkpoint_dir,
        metrics_file=config.paths.workdir / "metrics" / f"{run_id}.json",
        weights=model_weights(dp.module),
    )
    _write_json(result.metrics_file, result.to_json())
    return result


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
class _StepCounter:
    steps: int = 0


def _train_epochs(
    *,
    dp: DPComponents,
    dataset: Any,
    sampler: PoissonPatientSampler,
    plan: SamplingPlan,
    device: torch.device,
    taken: _StepCounter,
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
                    step=taken.steps,
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
                taken.steps += 1
                if loss is None:
                    empty += 1
                else:
                    losses.append(loss)
                notify(epoch, len(patients), loss)
            mean_loss = sum(losses) / len(losses) if losses else None
            if mean_loss is not None and not math.isfinite(mean_loss):
                raise TrainingError(
                    f"training diverged in epoch {epoch} (loss {mean_loss})",
                    hint="lower training.learning_rate or raise privacy.max_grad_norm",
                )
            reports.append(
                EpochReport(
                    epoch=epoch,
                    mean_loss=mean_loss,
                    empty_steps=empty,
                    epsilon=epsilon_after(taken.steps),
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


def _dp_step(
    dp: DPComponents, dataset: Any, patients: list[int], device: torch.device
) -> float | None:
    """One DP-SGD step over the sampled patients; returns the loss, or None for an empty draw."""
    dp.optimizer.zero_grad(set_to_none=True)
    if not patients:
        prepare_empty_step(dp.module)
        dp.optimizer.step()
        return None
    batch = collate_patients(items=[dataset[index] for index in patients], device=device)
    check_one_example_per_patient(batch["patient"].tolist(), int(batch["image"].shape[0]))
    loss = dp.per_sample_gradients(batch["image"], batch["label"])
    rows = per_sample_gradient_rows(dp.module)
    if rows != len(patients):
        raise PrivacyUnitError(
            f"{rows} per-sample gradients for {len(patients)} sampled patients",
            hint="the network or loss mixes examples across the batch (e.g. BatchNorm)",
        )
    dp.optimizer.step()
    return loss


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(data, indent=2, default=str).encode("utf-8"))
