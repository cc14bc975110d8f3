"""The DP-SGD steps of one round: the network wrapped for DP-SGD as planned, then its epochs of
Poisson-sampled patients, each step's noisy loss and, at each epoch's end, the epsilon spent.

:mod:`medfed.site.trainer` reserves the steps before this runs and commits the steps taken
after it; the optimiser and the batching are shared with the non-private baselines.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medfed.config.site import SiteConfig
from medfed.privacy.sampling import SamplingPlan
from medfed.site.adaptive_clip import adaptive_clip
from medfed.site.dp import (
    DPComponents,
    PoissonPatientSampler,
    check_one_example_per_patient,
    make_private,
)
from medfed.site.round_plan import RoundSetup

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


def make_optimizer(*, config: SiteConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The site's optimiser over ``model``'s trainable parameters (before any DP wrapping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.training.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.training.learning_rate)
    return torch.optim.SGD(params, lr=config.training.learning_rate, momentum=0.9)


def collate_patients(*, items: Sequence[Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack patient items (``image``, ``label``, ``patient``) into one batch on ``device``."""
    from torch.utils.data import default_collate

    batch = default_collate(list(items))
    return {key: torch.as_tensor(value).to(device) for key, value in batch.items()}


def private_training(
    *,
    config: SiteConfig,
    model: nn.Module,
    setup: RoundSetup,
    proximal_mu: float,
    augmentation_multiplicity: int = 1,
) -> DPComponents:
    """The network, its optimiser and the loss coordinate wrapped for DP-SGD as planned.

    The plan decides the clip: ``max_grad_norm``, and adaptive clipping exactly when it
    records a count noise (so the ledger always describes the steps taken); then the sum's
    noise is the plan's, split with the count (:mod:`medfed.site.adaptive_clip`).
    ``augmentation_multiplicity`` views of each sampled patient are averaged before clipping.
    """
    plan = setup.plan
    adaptive = None
    noise = plan.noise_multiplier
    if plan.count_noise_multiplier is not None:
        split = plan.adaptive_noise
        noise = split.sum_noise_multiplier
        adaptive = adaptive_clip(config=config, setup=setup, count_std=split.count_std)
    dp = make_private(
        model=model,
        num_classes=len(config.data.classes),
        optimizer=make_optimizer(config=config, model=model),
        noise_multiplier=noise,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=setup.sampling.expected_batch_size,
        grad_sample_mode=config.training.grad_sample_mode,
        secure_mode=config.privacy.secure_mode,
        loss_clip=config.release.loss_clip,
        loss_share=config.release.loss_share,
        augmentation_multiplicity=augmentation_multiplicity,
        adaptive=adaptive,
    )
    if proximal_mu > 0:
        _add_proximal_term(dp, mu=proximal_mu)
    return dp


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
class Progress:
    steps: int = 0
    losses: list[float] = field(default_factory=list)


def train_epochs(
    *,
    dp: DPComponents,
    dataset: Any,
    sampler: PoissonPatientSampler,
    plan: SamplingPlan,
    device: torch.device,
    progress: Progress,
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
    """One DP-SGD step over the sampled patients (possibly none); its noisy mean loss.

    Each item is a fresh draw of the random crop and augmentation, so ``dp.views`` items of
    one patient are independent views of it, in consecutive rows.
    """
    if not patients:
        return dp.step(None, None)
    items = [dataset[index] for index in patients for _view in range(dp.views)]
    batch = collate_patients(items=items, device=device)
    check_one_example_per_patient(
        batch["patient"].tolist(), int(batch["image"].shape[0]), views=dp.views
    )
    return dp.step(batch["image"], batch["label"])
