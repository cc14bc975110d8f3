"""DP-SGD machinery at the site: Poisson sampling over patients and the Opacus wrappers.

Sampling is done here rather than by Opacus' ``DPDataLoader`` so that the privacy unit stays
explicit: every step draws a set of *patient indices*, each sampled patient yields exactly one
(image, label) crop, and an empty draw is a real DP step (noise only) instead of a special case
inside a collate function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class SamplingPlan:
    """How many DP steps a round takes and with which Poisson rate."""

    dataset_size: int
    sample_rate: float
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.dataset_size))


def plan_sampling(*, dataset_size: int, batch_size: int, epochs: int) -> SamplingPlan:
    """Sample rate ``batch_size / N`` and ``1 / q`` steps per epoch, as Opacus does."""
    sample_rate = min(1.0, batch_size / dataset_size)
    steps_per_epoch = max(1, math.floor(1.0 / sample_rate + 1e-9))
    return SamplingPlan(
        dataset_size=dataset_size,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
    )


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


@dataclass
class DPComponents:
    """The wrapped model and optimiser that perform DP-SGD."""

    module: nn.Module
    optimizer: torch.optim.Optimizer


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    grad_sample_mode: GradSampleMode,
    secure_mode: bool,
) -> DPComponents:
    """Wrap ``model`` for per-sample gradients and ``optimizer`` for clipping and noise.

    Accounting is not attached: the site's ledger is the only accountant.
    """
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import get_optimizer_class

    module = prepare_module(
        model, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean"
    )
    optimizer_class = get_optimizer_class(
        clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode
    )
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(entropy_seed()),
        secure_mode=secure_mode,
    )
    return DPComponents(module=module, optimizer=dp_optimizer)


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
