"""DP-SGD machinery at the site: Poisson sampling over patients and the Opacus wrappers.

Sampling is done here rather than by Opacus' ``DPDataLoader`` so that the privacy unit stays
explicit: every step draws a set of *patient indices*, each sampled patient yields exactly one
(image, label) crop, and an empty draw is a real DP step (noise only) instead of a special case
inside a collate function.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medfed.config.site import GradSampleMode
from medfed.errors import PrivacyUnitError

if TYPE_CHECKING:
    from medfed.site.adaptive_clip import AdaptiveClip


class PoissonPatientSampler:
    """Independent Bernoulli(q) draws over patients, one index set per step.

    The uniforms come straight from ``os.urandom``: which patients a step used is as secret
    as its noise. An index appears at most once per step.
    """

    def __init__(self, *, num_patients: int, sample_rate: float) -> None:
        self.num_patients = num_patients
        self.sample_rate = sample_rate

    def _uniforms(self) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(os.urandom(8 * self.num_patients)), dtype=torch.int64)
        # 53 random bits -> an exact uniform double in [0, 1).
        return (raw & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)

    def draw(self) -> list[int]:
        """The patients sampled for one step (possibly none)."""
        mask = self._uniforms() < self.sample_rate
        return [int(i) for i in torch.nonzero(mask).flatten()]

    def steps(self, count: int) -> Iterator[list[int]]:
        for _ in range(count):
            yield self.draw()


def check_one_example_per_patient(
    patients: Sequence[int], batch_size: int, *, views: int = 1
) -> None:
    """Refuse a batch in which a patient appears twice or the batch is not one row per patient.

    A pipeline that returns several crops per patient would clip each crop separately, so the
    real sensitivity would be a multiple of the clipping norm while the ledger records one.
    With augmentation multiplicity, ``patients`` names each row's patient: ``views``
    consecutive rows per patient, whose gradients :meth:`DPComponents.step` averages into
    that patient's one clipped vector.
    """
    groups = [patients[start : start + views] for start in range(0, len(patients), views)]
    owners = [group[0] for group in groups]
    if (
        len(patients) % views
        or any(len(set(group)) != 1 for group in groups)
        or len(set(owners)) != len(owners)
        or batch_size != len(patients)
    ):
        raise PrivacyUnitError(
            f"a DP batch holds {batch_size} examples for {len(set(patients))} distinct patients "
            f"({len(owners)} sampled, {views} view(s) each)",
            hint="each sampled patient must give exactly one crop per view per step "
            "(RandCropByPosNegLabeld num_samples=1), its views in consecutive rows",
        )


# Fills every parameter's ``grad_sample`` for a batch and returns each example's loss.
Gradients = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LossCoordinate:
    """The training loss as one more coordinate of each patient's clipped gradient.

    Each patient's loss is clipped to ``[0, clip]`` and scaled by ``scale = share x C / clip``
    (C the clipping norm), so it takes at most ``share`` of the norm the patient's whole
    vector is clipped to. The DP optimiser clips that vector and adds its Gaussian noise to
    the loss coordinate as to every other: the noisy loss sum is part of the DP-SGD step's
    output and costs no privacy beyond the step itself.
    """

    clip: float
    share: float
    max_grad_norm: float

    @property
    def scale(self) -> float:
        return self.share * self.max_grad_norm / self.clip

    def step_std(self, *, noise_multiplier: float, expected_batch_size: int) -> float:
        """Standard deviation of one step's noisy mean-loss estimate."""
        return noise_multiplier * self.max_grad_norm / (self.scale * expected_batch_size)


@dataclass
class DPComponents:
    """The model and optimiser that perform DP-SGD, and how a batch's gradients are made.

    ``per_sample_gradients(images, labels)`` leaves one gradient row per example in every
    parameter's ``grad_sample`` and returns the examples' losses; :meth:`step` then clips
    each row, sums, adds the noise and updates, and returns the step's noisy loss estimate.

    With ``views`` > 1 (augmentation multiplicity, De et al. 2022, arXiv:2204.13650) a batch
    holds ``views`` augmented views of each sampled patient in consecutive rows; their
    gradients and losses are averaged into one row per patient *before* clipping, so a
    patient still moves the step by at most the clipping norm. With ``adaptive`` the clip
    moves after every step (:mod:`medfed.site.adaptive_clip`).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    per_sample_gradients: Gradients
    loss: LossCoordinate
    probe: nn.Parameter
    views: int = 1
    adaptive: AdaptiveClip | None = None

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier of the clipped sum (above the ledger's with adaptive clipping)."""
        return float(self.optimizer.noise_multiplier)  # type: ignore[attr-defined]

    def step(self, images: torch.Tensor | None, labels: torch.Tensor | None) -> float:
        """One DP-SGD step (an empty draw when ``images`` is None); the noisy mean loss.

        A patient whose gradient or loss is not finite contributes a zero gradient and the
        loss bound instead, so that neither the step count nor anything else the site
        releases depends on whether some patient's data is broken.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if images is None or labels is None:
            prepare_empty_step(self.module)
            rows = torch.zeros((0, 1), dtype=self.probe.dtype, device=self.probe.device)
        else:
            losses = self.per_sample_gradients(images, labels).detach()
            rows_made = per_sample_gradient_rows(self.module)
            if rows_made != images.shape[0] or rows_made % self.views:
                raise PrivacyUnitError(
                    f"{rows_made} per-sample gradients for {images.shape[0]} rows of sampled "
                    f"patients ({self.views} view(s) each)",
                    hint="the network or loss mixes examples across the batch (e.g. BatchNorm)",
                )
            losses, finite = patient_rows(self.module, losses, views=self.views)
            bounded = torch.where(finite, losses, torch.full_like(losses, self.loss.clip))
            bounded = bounded.clamp(0.0, self.loss.clip) * self.loss.scale
            rows = bounded.to(self.probe.dtype).reshape(-1, 1)
        self.probe.grad_sample = rows  # type: ignore[attr-defined]
        norms = _per_sample_norms(self.optimizer) if self.adaptive is not None else None
        self.optimizer.step()
        assert self.probe.grad is not None
        # p.grad is (noisy sum) / expected batch size; back in loss units, a mean estimate.
        estimate = float(self.probe.grad.detach().reshape(-1)[0]) / self.loss.scale
        with torch.no_grad():
            self.probe.zero_()
        if self.adaptive is not None and norms is not None:
            clip = self.adaptive.update(norms)
            # The loss coordinate keeps its share of the new clip; its noise in loss units,
            # noise x clip / scale, does not change.
            self.optimizer.max_grad_norm = clip  # type: ignore[attr-defined]
            self.loss = dataclasses.replace(self.loss, max_grad_norm=clip)
        return estimate


def patient_rows(
    module: nn.Module, losses: torch.Tensor, *, views: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient row per patient in every ``grad_sample``: views averaged, and the rows of a
    patient whose gradient or loss is not finite set to zero. The patients' losses and which
    of them were finite."""
    if views > 1:
        losses = _average_views(module, losses, views=views)
    finite = _finite_rows(module) & torch.isfinite(losses)
    _zero_rows(module, keep=finite)
    return losses, finite


def _average_views(module: nn.Module, losses: torch.Tensor, *, views: int) -> torch.Tensor:
    """Average each patient's ``views`` consecutive gradient rows and losses into one."""
    for parameter in module.parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            grouped = grad_sample.reshape(-1, views, *grad_sample.shape[1:])
            parameter.grad_sample = grouped.mean(dim=1)  # type: ignore[attr-defined]
    return losses.reshape(-1, views).mean(dim=1)


def _per_sample_norms(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Each row's norm over every parameter, as Opacus' clipping computes it."""
    grad_samples: list[torch.Tensor] = optimizer.grad_samples  # type: ignore[attr-defined]
    if len(grad_samples[0]) == 0:
        return torch.zeros(0)
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1).cpu() for g in grad_samples]
    norms: torch.Tensor = torch.stack(per_param, dim=1).norm(2, dim=1)
    return norms


def _finite_rows(module: nn.Module) -> torch.Tensor:
    """For each example of the last backward pass: whether all its gradients are finite."""
    finite: torch.Tensor | None = None
    for parameter in module.parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            rows = torch.isfinite(grad_sample.reshape(grad_sample.shape[0], -1)).all(dim=1)
            finite = rows if finite is None else finite & rows
    assert finite is not None, "no per-sample gradients to check"
    return finite


def _zero_rows(module: nn.Module, *, keep: torch.Tensor) -> None:
    if bool(keep.all()):
        return
    for parameter in module.parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            mask = keep.reshape(-1, *([1] * (grad_sample.dim() - 1)))
            parameter.grad_sample = torch.where(  # type: ignore[attr-defined]
                mask, grad_sample, torch.zeros_like(grad_sample)
            )


def segmentation_loss(*, onehot_targets: bool) -> nn.Module:
    """Dice + cross-entropy over the foreground classes, one term per example.

    ``batch=False`` keeps Dice per example, so the batch loss is the mean of per-patient losses
    and each patient's gradient is exactly its own.
    """
    from monai.losses.dice import DiceCELoss

    return DiceCELoss(
        to_onehot_y=not onehot_targets, softmax=True, batch=False, include_background=False
    )


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_classes: int,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    grad_sample_mode: GradSampleMode,
    secure_mode: bool,
    loss_clip: float = 2.0,
    loss_share: float = 0.3,
    augmentation_multiplicity: int = 1,
    adaptive: AdaptiveClip | None = None,
) -> DPComponents:
    """Set ``model`` up for per-sample gradients and wrap ``optimizer`` for clipping and noise.

    ``hooks`` and ``functorch`` wrap the model in Opacus' GradSampleModule. ``vmap`` leaves it
    plain and differentiates one example's loss with ``torch.func``, vectorised over the batch:
    one forward and one backward pass for the whole network (see benchmarks/README.md).
    The noise comes from a CSPRNG (:mod:`medfed.site.noise`); ``secure_mode`` adds the
    defence against floating-point attacks. The training loss rides along as one more
    coordinate (:class:`LossCoordinate`), in a parameter group the optimiser does not move.
    Accounting is not attached: the site's ledger is the only accountant.
    ``augmentation_multiplicity`` is the number of views per patient in a batch (see
    :class:`DPComponents`); ``adaptive`` the clip state when the clip adapts, whose clip is
    then the one the first step uses.
    """
    if augmentation_multiplicity < 1:
        raise PrivacyUnitError(
            f"augmentation multiplicity must be at least 1, got {augmentation_multiplicity}",
            hint="set training.augmentation_multiplicity to 1 or more",
        )
    from medfed.site.noise import CsprngDPOptimizer

    module, per_sample = per_sample_gradients(
        model=model, num_classes=num_classes, grad_sample_mode=grad_sample_mode
    )
    reference = next(p for p in model.parameters() if p.requires_grad)
    probe = nn.Parameter(torch.zeros(1, dtype=reference.dtype, device=reference.device))
    optimizer.add_param_group({"params": [probe], "lr": 0.0, "weight_decay": 0.0})
    clip = max_grad_norm if adaptive is None else adaptive.clip
    dp_optimizer = CsprngDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        secure_mode=secure_mode,
    )
    return DPComponents(
        module=module,
        optimizer=dp_optimizer,
        per_sample_gradients=per_sample,
        loss=LossCoordinate(clip=loss_clip, share=loss_share, max_grad_norm=clip),
        probe=probe,
        views=augmentation_multiplicity,
        adaptive=adaptive,
    )


def per_sample_gradients(
    *, model: nn.Module, num_classes: int, grad_sample_mode: GradSampleMode
) -> tuple[nn.Module, Gradients]:
    """The module to run and the function that fills its per-sample gradients.

    ``hooks`` and ``functorch`` wrap the model in Opacus' GradSampleModule; ``vmap`` leaves it
    plain and differentiates one example's loss with ``torch.func``.
    """
    if grad_sample_mode == "vmap":
        return model, _vmap_gradients(model, num_classes)
    from opacus.grad_sample.utils import prepare_module

    module = prepare_module(
        model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean"
    )
    return module, _backward_gradients(module)


def _backward_gradients(module: nn.Module) -> Gradients:
    loss_fn = segmentation_loss(onehot_targets=False)

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        output = module(images)
        loss = loss_fn(output, labels)
        loss.backward()  # Opacus' hooks turn this into per-sample gradients
        with torch.no_grad():
            # batch=False: the batch loss is the mean of these, one per patient.
            return torch.stack(
                [loss_fn(output[i : i + 1], labels[i : i + 1]) for i in range(len(output))]
            )

    return gradients


def _vmap_gradients(model: nn.Module, num_classes: int) -> Gradients:
    from torch.func import functional_call, grad_and_value, vmap

    loss_fn = segmentation_loss(onehot_targets=True)

    def example_loss(
        params: dict[str, torch.Tensor], image: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        loss: torch.Tensor = loss_fn(functional_call(model, params, (image[None],)), target[None])
        return loss

    per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # One-hot encoding scatters, which vmap cannot batch: encode the targets outside.
        target = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes)
        target = target.movedim(-1, 1).to(images.dtype)
        grads, losses = per_example({n: p.detach() for n, p in named}, images, target)
        for name, parameter in named:
            parameter.grad_sample = grads[name]  # type: ignore[attr-defined]
        detached: torch.Tensor = losses.detach()
        return detached

    return gradients


def prepare_empty_step(module: nn.Module) -> None:
    """Give every parameter a zero-row per-sample gradient so an empty draw becomes a step.

    The DP optimiser then clips nothing, adds the Gaussian noise and scales by the expected
    batch size: exactly the mechanism's output for an empty Poisson sample.
    """
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                (0, *parameter.shape), dtype=parameter.dtype, device=parameter.device
            )


def per_sample_gradient_rows(module: nn.Module) -> int:
    """How many per-sample gradients the last backward pass produced (checks the unit)."""
    for parameter in module.parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            return int(grad_sample.shape[0])
        if isinstance(grad_sample, list) and grad_sample:
            return int(sum(g.shape[0] for g in grad_sample))
    return 0
