"""DP-SGD machinery at the site: Poisson sampling over patients and the Opacus wrappers.

Sampling is done here rather than by Opacus' ``DPDataLoader`` so that the privacy unit stays
explicit: every step draws a set of *patient indices*, each sampled patient yields exactly one
(image, label) crop, and an empty draw is a real DP step (noise only) instead of a special case
inside a collate function.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medfed.config.site import GradSampleMode
from medfed.errors import PrivacyUnitError


def entropy_seed() -> int:
    """A 63-bit seed from the operating system's CSPRNG.

    Noise and patient sampling are never seeded from the configuration: a noise seed that can
    be known is noise that can be subtracted.
    """
    return int.from_bytes(os.urandom(8), "little") >> 1


class PoissonPatientSampler:
    """Independent Bernoulli(q) draws over patients, one index set per step.

    In secure mode the uniforms come straight from ``os.urandom``; otherwise from a torch
    generator seeded from OS entropy. Either way an index appears at most once per step.
    """

    def __init__(self, *, num_patients: int, sample_rate: float, secure: bool) -> None:
        self.num_patients = num_patients
        self.sample_rate = sample_rate
        self.secure = secure
        self._generator = torch.Generator().manual_seed(entropy_seed())

    def _uniforms(self) -> torch.Tensor:
        if self.secure:
            raw = torch.frombuffer(bytearray(os.urandom(8 * self.num_patients)), dtype=torch.int64)
            # 53 random bits -> an exact uniform double in [0, 1).
            return (raw & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
        return torch.rand(self.num_patients, generator=self._generator, dtype=torch.float64)

    def draw(self) -> list[int]:
        """The patients sampled for one step (possibly none)."""
        mask = self._uniforms() < self.sample_rate
        return [int(i) for i in torch.nonzero(mask).flatten()]

    def steps(self, count: int) -> Iterator[list[int]]:
        for _ in range(count):
            yield self.draw()


def check_one_example_per_patient(patients: Sequence[int], batch_size: int) -> None:
    """Refuse a batch in which a patient appears twice or the batch is not one row per patient.

    A pipeline that returns several crops per patient would clip each crop separately, so the
    real sensitivity would be a multiple of the clipping norm while the ledger records one.
    """
    if len(set(patients)) != len(patients) or batch_size != len(patients):
        raise PrivacyUnitError(
            f"a DP batch holds {batch_size} examples for {len(set(patients))} distinct patients "
            f"({len(patients)} sampled)",
            hint="each sampled patient must give exactly one crop per step "
            "(RandCropByPosNegLabeld num_samples=1)",
        )


Gradients = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class DPComponents:
    """The model and optimiser that perform DP-SGD, and how a batch's gradients are made.

    ``per_sample_gradients(images, labels)`` leaves one gradient row per example in every
    parameter's ``grad_sample`` and returns the batch's mean loss; ``optimizer.step()`` then
    clips each row, sums, adds the noise and updates.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    per_sample_gradients: Gradients


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
) -> DPComponents:
    """Set ``model`` up for per-sample gradients and wrap ``optimizer`` for clipping and noise.

    ``hooks`` and ``functorch`` wrap the model in Opacus' GradSampleModule. ``vmap`` leaves it
    plain and differentiates one example's loss with ``torch.func``, vectorised over the batch:
    one forward and one backward pass for the whole network (see benchmarks/README.md).
    Accounting is not attached: the site's ledger is the only accountant.
    """
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    if grad_sample_mode == "vmap":
        module: nn.Module = model
        per_sample = _vmap_gradients(model, num_classes)
    else:
        module = prepare_module(
            model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean"
        )
        per_sample = _backward_gradients(module)
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(entropy_seed()),
        secure_mode=secure_mode,
    )
    return DPComponents(module=module, optimizer=dp_optimizer, per_sample_gradients=per_sample)


def _backward_gradients(module: nn.Module) -> Gradients:
    loss_fn = segmentation_loss(onehot_targets=False)

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> float:
        loss = loss_fn(module(images), labels)
        loss.backward()  # Opacus' hooks turn this into per-sample gradients
        return float(loss.detach())

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

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> float:
        # One-hot encoding scatters, which vmap cannot batch: encode the targets outside.
        target = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes)
        target = target.movedim(-1, 1).to(images.dtype)
        grads, losses = per_example({n: p.detach() for n, p in named}, images, target)
        for name, parameter in named:
            parameter.grad_sample = grads[name]  # type: ignore[attr-defined]
        return float(losses.mean())

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
