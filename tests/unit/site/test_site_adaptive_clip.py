"""Adaptive clipping at the site: the clip tracks a quantile, and the noise is split as planned."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from medfed.config import SiteConfig, load_site_config
from medfed.config.site import AdaptiveClipping
from medfed.data.synth import synthesize_site
from medfed.errors import ConfigError
from medfed.privacy import SiteLedger, plan_sampling
from medfed.privacy.accounting import DPSteps, adaptive_clipping_noise, compute_epsilon
from medfed.privacy.site_ledger import RoundPlan
from medfed.site.adaptive_clip import (
    COUNT_NOISE_FACTOR,
    AdaptiveClip,
    load_clip,
    save_clip,
    with_adaptive_clipping,
)
from medfed.site.dp import make_private
from medfed.site.epochs import private_training
from medfed.site.release import PatientCounts
from medfed.site.round_plan import RoundSetup

BATCH = 20


def _toy_step_clips(*, start: float, quantile: float, steps: int) -> list[float]:
    """DP-SGD steps whose patients' gradient norms are log-normal with median 1 (sigma 0.5)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    adaptive = AdaptiveClip(
        clip=start,
        target_quantile=quantile,
        learning_rate=0.2,
        count_std=1.0,
        expected_batch_size=BATCH,
    )
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        num_classes=2,
        noise_multiplier=1.0,
        max_grad_norm=start,
        expected_batch_size=BATCH,
        grad_sample_mode="hooks",
        secure_mode=False,
        adaptive=adaptive,
    )
    generator = torch.Generator().manual_seed(5)

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = torch.exp(0.5 * torch.randn(BATCH, generator=generator))
        direction = torch.randn(BATCH, 8, generator=generator)
        direction /= direction.norm(dim=1, keepdim=True)
        model.weight.grad_sample = (direction * norms[:, None])[:, None, :]  # type: ignore[attr-defined]
        model.bias.grad_sample = torch.zeros(BATCH, 1)  # type: ignore[attr-defined]
        return torch.zeros(BATCH, dtype=torch.float64)  # zero loss: the norm is the gradient's

    dp.per_sample_gradients = gradients
    clips = []
    for _ in range(steps):
        dp.step(torch.zeros(BATCH, 8), torch.zeros(BATCH, dtype=torch.long))
        clips.append(adaptive.clip)
        # the next step clips at the new clip, and the loss coordinate keeps its share of it
        assert dp.optimizer.max_grad_norm == adaptive.clip == dp.loss.max_grad_norm  # type: ignore[attr-defined]
    return clips


@pytest.mark.parametrize(("quantile", "start"), [(0.5, 10.0), (0.5, 0.1), (0.9, 10.0)])
def test_the_clip_moves_to_the_target_quantile_of_the_gradient_norms(
    quantile: float, start: float
) -> None:
    clips = _toy_step_clips(start=start, quantile=quantile, steps=400)
    target = math.exp(0.5 * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile)))
    settled = sum(clips[-100:]) / 100
    assert settled == pytest.approx(float(target), rel=0.15)
    assert abs(math.log(clips[0] / float(target))) > abs(math.log(settled / float(target)))


def _config(tmp_path: Path, **adaptive: float | None) -> SiteConfig:
    synthesize_site(out=tmp_path / "site", cases=8, size=16, seed=2)
    config = load_site_config(tmp_path / "site" / "site.yaml")
    privacy = config.privacy.model_copy(
        update={"adaptive_clipping": AdaptiveClipping(**adaptive), "max_grad_norm": 0.7}
    )
    training = config.training.model_copy(
        update={"epochs": 1, "batch_size": 2, "grad_sample_mode": "vmap"}
    )
    return config.model_copy(update={"privacy": privacy, "training": training})


def _setup(noise: float) -> RoundSetup:
    sampling = plan_sampling(dataset_size=6, batch_size=2, epochs=1)
    plan = RoundPlan(
        run_id="run",
        round=3,
        planned_rounds=5,
        steps=sampling.steps,
        sample_rate=sampling.sample_rate,
        noise_multiplier=noise,
        max_grad_norm=0.7,
    )
    return RoundSetup(
        counts=PatientCounts(train=6, validation=2, seq=1), sampling=sampling, plan=plan, prior=()
    )


def test_the_plan_records_the_count_noise_and_the_sum_gets_the_rest(tmp_path: Path) -> None:
    config = _config(tmp_path)
    setup = with_adaptive_clipping(config=config, setup=_setup(1.3), run_id="run", round_index=3)
    assert setup.plan.count_noise_multiplier == COUNT_NOISE_FACTOR * 1.3
    assert setup.plan.noise_multiplier == 1.3 and setup.plan.max_grad_norm == 0.7
    # what the ledger charges is unchanged: the plan's own noise multiplier
    assert setup.plan.dp_steps == _setup(1.3).plan.dp_steps

    from medfed.site.trainer import build_site_model

    model, _ = build_site_model(config=config, device=torch.device("cpu"))
    dp = private_training(config=config, model=model, setup=setup, proximal_mu=0.0)
    split = adaptive_clipping_noise(noise_multiplier=1.3, count_noise_multiplier=6.5)
    assert dp.noise_multiplier == split.sum_noise_multiplier > 1.3
    assert dp.adaptive is not None and dp.adaptive.count_std == 6.5 / 2
    assert dp.adaptive.clip == 0.7 and dp.adaptive.expected_batch_size == 2
    # without adaptive clipping in the plan, nothing of it runs (the canary audit's plans)
    plain = private_training(config=config, model=model, setup=_setup(1.3), proximal_mu=0.0)
    assert plain.adaptive is None and plain.noise_multiplier == 1.3


def test_a_count_noise_below_the_rounds_noise_is_refused_by_name(tmp_path: Path) -> None:
    config = _config(tmp_path, count_noise_multiplier=1.2)
    refused = r"privacy\.adaptive_clipping\.count_noise_multiplier 1\.2 must exceed"
    with pytest.raises(ConfigError, match=refused):
        with_adaptive_clipping(config=config, setup=_setup(1.3), run_id="run", round_index=3)
    explicit = _config(tmp_path / "b", count_noise_multiplier=4.0)
    setup = with_adaptive_clipping(config=explicit, setup=_setup(1.3), run_id="run", round_index=3)
    assert setup.plan.count_noise_multiplier == 4.0


def test_a_round_starts_at_the_clip_the_runs_previous_round_ended_with(tmp_path: Path) -> None:
    config = _config(tmp_path)
    workdir = config.paths.workdir
    save_clip(workdir=workdir, run_id="run", round_index=2, clip=0.31)
    assert load_clip(workdir=workdir, run_id="run", before_round=3) == 0.31
    assert load_clip(workdir=workdir, run_id="run", before_round=2) is None  # not its own
    assert load_clip(workdir=workdir, run_id="other", before_round=3) is None
    setup = with_adaptive_clipping(config=config, setup=_setup(1.3), run_id="run", round_index=3)
    assert setup.plan.max_grad_norm == 0.31


def test_local_training_with_adaptive_clipping_spends_what_plain_dp_sgd_spends(
    tmp_path: Path,
) -> None:
    """Real data, network, Opacus steps and ledger: the reservation records the count noise,
    its epsilon is that of plain DP-SGD at the planned noise, and the clip carries over."""
    from medfed.site.trainer import train_local

    config = _config(tmp_path)
    config = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"epsilon_cap": 50.0})}
    )
    first = train_local(config=config, run_id="run-a", round_index=0, evaluate=False)
    ledger = SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )
    lines = [line for line in config.ledger_path.read_text().splitlines() if '"reserve"' in line]
    assert '"count_noise_multiplier":' in lines[0]
    plain = DPSteps(
        noise_multiplier=first.noise_multiplier, sample_rate=first.sample_rate, steps=first.steps
    )
    assert ledger.history() == [plain]
    assert first.epsilon_spent == compute_epsilon(
        history=[plain], delta=config.privacy.delta, accountant="rdp"
    )
    ended = load_clip(workdir=config.paths.workdir, run_id="run-a", before_round=1)
    assert ended is not None and ended != 0.7
    second = train_local(config=config, run_id="run-a", round_index=1, evaluate=False)
    assert second.reservation.plan.max_grad_norm == ended
    assert second.reservation.plan.count_noise_multiplier == COUNT_NOISE_FACTOR * (
        second.noise_multiplier
    )
