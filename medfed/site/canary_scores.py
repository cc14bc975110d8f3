"""Membership scores of canary patients: white-box gradient canaries and black-box losses.

White box (``gradient``), the paper's strongest setting: canary ``i`` owns one coordinate of
the network's parameters, and whenever the Poisson sampler draws it, its per-sample gradient is
a Dirac vector on that coordinate, :data:`DIRAC_SCALE` times the clipping norm long. The site's
DP optimiser clips, sums, noises and scales it exactly as it does a patient's gradient; the
auditor reads the noisy gradient the optimiser hands to its update (every step of DP-SGD is a
release the accountant covers) at each canary's coordinate. Divided by the clipping norm over
the expected batch size that reading is ``b + N(0, sigma^2)`` per step, ``b`` = 1 when the canary
was sampled, 0 otherwise; the score is the log-likelihood ratio of "sampled with probability q
in every step" against "never there", summed over the steps (the most powerful test per
canary, by Neyman and Pearson). With clipping off, no noise, or more sampling than recorded,
the included canaries stand out far beyond what the claimed epsilon allows.

Black box (``loss``): the canaries are trained as patients through the whole network, and a
canary's score is how much the training lowered its loss (its loss under the initial network
minus its loss under the trained one), on its whole preprocessed volume.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from medfed.errors import ConfigError, TrainingError
from medfed.privacy.site_ledger import RoundPlan
from medfed.site.dp import PoissonPatientSampler, segmentation_loss

#: A gradient canary's length in clipping norms: clipped to one norm by an honest run.
DIRAC_SCALE = 100.0


class RecordingSampler(PoissonPatientSampler):
    """The site's Poisson sampler, remembering each step's draw for the gradient canaries."""

    last: tuple[int, ...] = ()

    def draw(self) -> list[int]:
        patients = super().draw()
        self.last = tuple(patients)
        return patients


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The network's trainable parameters, in the order the Dirac coordinates count them."""
    return [p for p in module.parameters() if p.requires_grad]


class GradientCanaries:
    """Dirac gradients for the sampled canaries, and each canary's log-likelihood score.

    ``coordinates[i]`` is canary ``i``'s flat index over :func:`trainable_parameters`;
    ``included`` maps the training dataset's patient index to its canary. Use
    :meth:`gradients` as the DP components' per-sample gradient function and attach
    :meth:`observe` as the DP optimiser's step hook (it runs after clipping, noise and
    scaling, before the update).
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        coordinates: Sequence[int],
        included: Sequence[int],
        sampler: RecordingSampler,
        plan: RoundPlan,
        expected_batch_size: int,
    ) -> None:
        self.params = trainable_parameters(module)
        sizes = [p.numel() for p in self.params]
        starts = list(itertools.accumulate(sizes, initial=0))
        if len(set(coordinates)) != len(coordinates) or not all(
            0 <= c < starts[-1] for c in coordinates
        ):
            raise TrainingError(
                f"gradient canaries need distinct coordinates below {starts[-1]}",
                hint="draw the coordinates with canary_coordinates()",
            )
        self.where: list[tuple[int, int]] = []
        for coordinate in coordinates:
            index = bisect.bisect_right(starts, coordinate) - 1
            self.where.append((index, coordinate - starts[index]))
        # per parameter: the canaries it holds and their offsets, to read a step in one gather
        self._reads: list[tuple[int, npt.NDArray[np.int64], torch.Tensor]] = []
        for index in range(len(self.params)):
            owners = [i for i, (where, _) in enumerate(self.where) if where == index]
            if owners:
                offsets = [self.where[i][1] for i in owners]
                self._reads.append(
                    (
                        index,
                        np.asarray(owners, dtype=np.int64),
                        torch.as_tensor(offsets, device=self.params[index].device),
                    )
                )
        self.included = list(included)
        self.sampler = sampler
        self.magnitude = DIRAC_SCALE * plan.max_grad_norm
        # each step's reading, in units of one clipped gradient: b + N(0, sigma^2)
        self._unit = expected_batch_size / plan.max_grad_norm
        self._sigma2 = plan.noise_multiplier**2
        q = plan.sample_rate
        self._log_q = math.log(q)
        self._log_not_q = -math.inf if q >= 1.0 else math.log1p(-q)
        self.scores = np.zeros(len(coordinates), dtype=np.float64)
        self.steps = 0

    def gradients(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One Dirac row per sampled canary in every parameter's ``grad_sample``; zero losses."""
        rows = int(images.shape[0])
        patients = self.sampler.last
        if len(patients) != rows:
            raise TrainingError(
                f"{rows} canary rows for {len(patients)} sampled canaries",
                hint="the canary audit must train with its RecordingSampler",
            )
        flat: list[torch.Tensor] = []
        for parameter in self.params:
            grad_sample = torch.zeros(
                (rows, *parameter.shape), dtype=parameter.dtype, device=parameter.device
            )
            parameter.grad_sample = grad_sample  # type: ignore[attr-defined]
            flat.append(grad_sample.view(rows, -1))
        for row, patient in enumerate(patients):
            index, offset = self.where[self.included[patient]]
            flat[index][row, offset] = self.magnitude
        return torch.zeros(rows, dtype=torch.float32, device=images.device)

    def observe(self, optimizer: Any) -> None:
        """Add one step's log-likelihood ratio to every canary's score (a DP step hook)."""
        readings = np.empty(len(self.where), dtype=np.float64)
        for index, owners, offsets in self._reads:
            grad = self.params[index].grad
            if grad is None:
                raise TrainingError("the DP optimiser produced no gradient to audit")
            values = grad.detach().reshape(-1)[offsets]
            readings[owners] = values.to(torch.float64).cpu().numpy()
        units = readings * self._unit
        self.scores += np.logaddexp(self._log_not_q, self._log_q + (units - 0.5) / self._sigma2)
        self.steps += 1


def canary_coordinates(*, module: nn.Module, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct parameter coordinates, one per canary, drawn with ``rng``."""
    total = sum(p.numel() for p in trainable_parameters(module))
    if count > total:
        raise ConfigError(
            f"--canaries {count}: gradient canaries need a parameter each, and the site's "
            f"network has {total} trainable ones",
            hint=f"use --canaries {total} or fewer, or --score loss",
        )
    return [int(c) for c in rng.choice(total, size=count, replace=False)]


@torch.no_grad()
def canary_losses(
    *, model: nn.Module, volumes: Any, patch_size: Sequence[int], device: torch.device
) -> list[float]:
    """Each canary's segmentation loss on its whole preprocessed volume (sliding window)."""
    from monai.inferers.utils import sliding_window_inference

    from medfed.models.checkpoint import unwrap

    network = unwrap(model)
    was_training = network.training
    network.eval()
    loss_fn = segmentation_loss(onehot_targets=False)
    losses: list[float] = []
    try:
        for index in range(len(volumes)):
            item = volumes[index]
            image = torch.as_tensor(item["image"]).unsqueeze(0).to(device)
            label = torch.as_tensor(item["label"]).unsqueeze(0).to(device)
            logits = sliding_window_inference(
                image, roi_size=list(patch_size), sw_batch_size=4, predictor=network, overlap=0.25
            )
            assert isinstance(logits, torch.Tensor)
            losses.append(float(loss_fn(logits, label)))
    finally:
        network.train(was_training)
    return losses
