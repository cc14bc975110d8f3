"""Adaptive clipping at the site: the clip follows a DP estimate of a quantile of gradient norms.

Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially private learning with adaptive
clipping" (NeurIPS; arXiv:1905.03871), with the patient as the unit. Each DP-SGD step releases,
besides its noisy clipped sum, the noisy count of the sampled patients whose whole vector
(gradient and loss coordinate) was within the clip ``C``: each patient adds ``b - 1/2`` (so one
patient moves the count by at most 1/2) and the sum gets Gaussian noise of standard deviation
``sigma_b``. The unclipped share ``b = noisy count / expected batch size + 1/2`` then moves the
clip geometrically: ``C <- C * exp(-eta * (b - gamma))``.

Privacy: the round's noise multiplier ``z`` (the ledger's) is split so that the sum (noise
``z_sum * C``) and the count (noise ``sigma_b``) together are one Gaussian mechanism at ``z``
(:func:`medfed.privacy.accounting.adaptive_clipping_noise`); the reservation records the
count's noise multiplier ``2 sigma_b``. The clip is a function of the noisy counts and the
settings only, so using it is post-processing. The clip a round ends with is kept in the site's
workdir for the run's next round (a ClientApp process lives for one round); nothing about a
single patient is kept or logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from medfed.config.site import AdaptiveClipping, SiteConfig
from medfed.errors import ConfigError
from medfed.storage import read_json_object, replace_file

if TYPE_CHECKING:
    from medfed.site.noise import CsprngGaussian
    from medfed.site.round_plan import RoundSetup

# The count's noise multiplier when the site sets none, as a multiple of the round's: the sum
# then gets (1 - 1/25)^-1/2 = 1.02 times the noise it would have without the count.
COUNT_NOISE_FACTOR = 5.0
SETTING = "privacy.adaptive_clipping.count_noise_multiplier"


def _csprng() -> CsprngGaussian:
    from medfed.site.noise import CsprngGaussian  # imports Opacus: only once a step needs it

    return CsprngGaussian()


@dataclass
class AdaptiveClip:
    """The current clip and the geometric update that moves it after every step."""

    clip: float
    target_quantile: float
    learning_rate: float
    count_std: float
    expected_batch_size: int
    secure_mode: bool = False
    gaussian: CsprngGaussian = field(default_factory=_csprng, repr=False)

    def update(self, norms: torch.Tensor) -> float:
        """Release the step's noisy unclipped count for ``norms`` and move the clip; the new clip.

        ``norms`` are the norms of the vectors the step clipped, one per sampled patient
        (none for an empty draw, whose count is noise alone).
        """
        within = float((norms <= self.clip).sum()) - 0.5 * norms.numel()
        noise = self.gaussian.normal(
            shape=(1,),
            std=self.count_std,
            dtype=torch.float64,
            device=torch.device("cpu"),
            secure=self.secure_mode,
        )
        share = (within + float(noise[0])) / self.expected_batch_size + 0.5
        self.clip *= math.exp(-self.learning_rate * (share - self.target_quantile))
        return self.clip


def count_noise_multiplier(*, settings: AdaptiveClipping, noise_multiplier: float) -> float:
    """The count's noise multiplier for a round at ``noise_multiplier``; ConfigError if too low."""
    count = settings.count_noise_multiplier
    if count is None:
        return COUNT_NOISE_FACTOR * noise_multiplier
    if count <= noise_multiplier:
        raise ConfigError(
            f"{SETTING} {count:g} must exceed the round's noise multiplier "
            f"{noise_multiplier:.4g}: the count would take all of the step's noise budget",
            hint=f"raise {SETTING} to 3-10 times the noise multiplier, or leave it out "
            f"({COUNT_NOISE_FACTOR:g} times)",
        )
    return count


def with_adaptive_clipping(
    *, config: SiteConfig, setup: RoundSetup, run_id: str, round_index: int
) -> RoundSetup:
    """``setup`` with the count's noise and the clip the round starts from, when enabled.

    The clip starts where the run's previous round at this site left it, or at
    ``privacy.max_grad_norm`` (or the run's clip) for the first round.
    """
    settings = config.privacy.adaptive_clipping
    if settings is None:
        return setup
    plan = setup.plan
    count = count_noise_multiplier(settings=settings, noise_multiplier=plan.noise_multiplier)
    start = load_clip(workdir=config.paths.workdir, run_id=run_id, before_round=round_index)
    adapted = dataclasses.replace(
        plan,
        max_grad_norm=plan.max_grad_norm if start is None else start,
        count_noise_multiplier=count,
    )
    return dataclasses.replace(setup, plan=adapted)


def adaptive_clip(*, config: SiteConfig, setup: RoundSetup, count_std: float) -> AdaptiveClip:
    """The clip state of a round planned by :func:`with_adaptive_clipping`."""
    settings = config.privacy.adaptive_clipping or AdaptiveClipping()
    return AdaptiveClip(
        clip=setup.plan.max_grad_norm,
        target_quantile=settings.target_quantile,
        learning_rate=settings.learning_rate,
        count_std=count_std,
        expected_batch_size=setup.sampling.expected_batch_size,
        secure_mode=config.privacy.secure_mode,
    )


def clip_file(*, workdir: Path, run_id: str) -> Path:
    """Where the clip of a run's last round is kept (the name hides nothing: a run id digest)."""
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:32]
    return workdir / "adaptive_clip" / f"{digest}.json"


def load_clip(*, workdir: Path, run_id: str, before_round: int) -> float | None:
    """The clip an earlier round of ``run_id`` ended with; None when there is none."""
    data = read_json_object(clip_file(workdir=workdir, run_id=run_id))
    if data is None:
        return None
    clip = data.get("clip")
    round_done = data.get("round")
    if (
        data.get("run_id") != run_id
        or not isinstance(round_done, int)
        or round_done >= before_round
        or not isinstance(clip, float)
        or not 0.0 < clip < math.inf
    ):
        return None
    return clip


def save_clip(*, workdir: Path, run_id: str, round_index: int, clip: float) -> None:
    """Keep the clip ``round_index`` ended with, for the run's next round."""
    path = clip_file(workdir=workdir, run_id=run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"run_id": run_id, "round": round_index, "clip": float(clip)}
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
