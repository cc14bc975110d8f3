"""How a round's DP-SGD steps are laid out: Poisson rate and number of steps.

Pure arithmetic shared by the site trainer (which runs the plan) and by anything that must
predict a round's privacy cost before it runs (configuration defaults, planners).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medfed.errors import PrivacyError


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
    if dataset_size < 1 or batch_size < 1 or epochs < 0:
        raise PrivacyError(
            f"cannot plan DP-SGD over {dataset_size} patients with batch size {batch_size} "
            f"and {epochs} epochs",
            hint="a site needs at least one training patient, and batch_size must be positive",
        )
    return plan_at_rate(
        dataset_size=dataset_size, sample_rate=min(1.0, batch_size / dataset_size), epochs=epochs
    )


def plan_at_rate(*, dataset_size: int, sample_rate: float, epochs: int) -> SamplingPlan:
    """A given sample rate and ``1 / q`` steps per epoch: a plan that does not depend on N."""
    if not 0 < sample_rate <= 1 or epochs < 0:
        raise PrivacyError(
            f"cannot plan DP-SGD at sample rate {sample_rate} over {epochs} epochs",
            hint="a sample rate is in (0, 1], and epochs must not be negative",
        )
    steps_per_epoch = max(1, math.floor(1.0 / sample_rate + 1e-9))
    return SamplingPlan(
        dataset_size=dataset_size,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
    )


def plan_site_sampling(
    *, dataset_size: int, batch_size: int, sample_rate: float | None, epochs: int
) -> SamplingPlan:
    """A site's plan: at its ``training.sample_rate`` where it sets one, else ``B / N``."""
    if sample_rate is None:
        return plan_sampling(dataset_size=dataset_size, batch_size=batch_size, epochs=epochs)
    return plan_at_rate(dataset_size=dataset_size, sample_rate=sample_rate, epochs=epochs)
