"""Poisson sampling over patients, the one-example-per-patient guard, and empty steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from medfed.errors import PrivacyError, PrivacyUnitError
from medfed.privacy import plan_sampling
from medfed.site.dp import (
    DPComponents,
    LossCoordinate,
    PoissonPatientSampler,
    check_one_example_per_patient,
    make_private,
    per_sample_gradient_rows,
    prepare_empty_step,
)


def test_plan_matches_opacus_convention() -> None:
    plan = plan_sampling(dataset_size=20, batch_size=4, epochs=3)
    assert plan.sample_rate == pytest.approx(0.2)
    assert plan.steps_per_epoch == 5
    assert plan.steps == 15
    assert plan.expected_batch_size == 4


def test_plan_refuses_an_empty_site() -> None:
    with pytest.raises(PrivacyError, match="over 0 patients"):
        plan_sampling(dataset_size=0, batch_size=4, epochs=1)


def test_plan_caps_the_rate_at_one() -> None:
    plan = plan_sampling(dataset_size=3, batch_size=8, epochs=2)
    assert plan.sample_rate == 1.0
    assert plan.steps_per_epoch == 1
    assert plan.expected_batch_size == 3


def test_sampler_draws_each_patient_at_most_once_with_rate_q() -> None:
    sampler = PoissonPatientSampler(num_patients=50, sample_rate=0.1)
    draws = list(sampler.steps(400))
    assert all(len(set(d)) == len(d) for d in draws)
    assert all(0 <= i < 50 for d in draws for i in d)
    mean = sum(len(d) for d in draws) / len(draws)
    # Binomial(50, 0.1) averaged over 400 draws: sd of the mean is about 0.1.
    assert abs(mean - 5.0) < 0.6

    # With two patients at q=0.1 most draws are empty (p=0.81); they are yielded, not skipped.
    small = list(PoissonPatientSampler(num_patients=2, sample_rate=0.1).steps(200))
    assert len(small) == 200
    assert sum(1 for d in small if not d) > 100


def test_sampler_is_not_reproducible_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    first = list(PoissonPatientSampler(num_patients=100, sample_rate=0.5).steps(5))
    second = list(PoissonPatientSampler(num_patients=100, sample_rate=0.5).steps(5))
    assert first != second
    # The draws come from the operating system's CSPRNG and nothing else.
    monkeypatch.setattr("medfed.site.dp.os.urandom", lambda n: bytes(n))
    assert list(PoissonPatientSampler(num_patients=3, sample_rate=0.5).steps(2)) == [
        [0, 1, 2],
        [0, 1, 2],
    ]


def test_guard_refuses_a_patient_twice_or_extra_rows() -> None:
    check_one_example_per_patient([0, 3, 5], 3)
    with pytest.raises(PrivacyUnitError, match="distinct patients"):
        check_one_example_per_patient([0, 3, 3], 3)
    with pytest.raises(PrivacyUnitError):
        check_one_example_per_patient([0, 3], 4)


def _tiny_dp(noise: float, *, expected_batch_size: int = 2) -> tuple[DPComponents, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        num_classes=2,
        noise_multiplier=noise,
        max_grad_norm=1.0,
        expected_batch_size=expected_batch_size,
        grad_sample_mode="hooks",
        secure_mode=False,
        loss_clip=2.0,
        loss_share=0.3,
    )
    return dp, model


def test_empty_draw_is_a_noise_only_step() -> None:
    dp, model = _tiny_dp(noise=1.0)
    before = model.weight.detach().clone()
    estimate = dp.step(None, None)
    change = model.weight.detach() - before
    # lr 1, noise std = sigma * C / expected batch = 0.5 per coordinate.
    assert change.abs().sum() > 0
    assert change.std().item() == pytest.approx(0.5, rel=0.1)
    # The loss coordinate is noise alone, and the optimiser never moves it.
    assert estimate != 0.0 and float(dp.probe.detach()) == 0.0


def test_empty_draw_without_noise_leaves_the_model_alone() -> None:
    dp, model = _tiny_dp(noise=1e-12)
    before = model.weight.detach().clone()
    assert dp.step(None, None) == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(model.weight, before, atol=1e-9)


def test_per_sample_rows_count_examples_in_the_backward_pass() -> None:
    dp, _ = _tiny_dp(noise=1.0)
    dp.optimizer.zero_grad(set_to_none=True)
    dp.module(torch.randn(3, 64, requires_grad=True)).sum().backward()
    assert per_sample_gradient_rows(dp.module) == 3
    prepare_empty_step(dp.module)  # and the rows of an empty draw
    assert per_sample_gradient_rows(dp.module) == 0
    assert not math.isnan(float(next(dp.module.parameters()).detach().sum()))


def _default_3d_network() -> nn.Module:
    from medfed.config import SiteConfig
    from medfed.models import build_model, spec_from_config

    config = SiteConfig.model_validate(
        {"site_id": "t", "data": {"manifest": "m.csv", "patch_size": [16, 16, 16]}}
    )
    torch.manual_seed(0)
    return build_model(spec=spec_from_config(config)).to(torch.float64)


@pytest.mark.parametrize("mode", ["vmap", "hooks", "functorch"])
def test_site_per_sample_gradients_equal_single_patient_backward_passes(mode: str) -> None:
    """The gradients the trainer clips are each patient's own, in every supported mode."""
    from medfed.site.dp import segmentation_loss

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 1, 16, 16, 16, generator=generator, dtype=torch.float64)
    labels = (torch.rand(3, 1, 16, 16, 16, generator=generator) > 0.7).long()
    reference = _default_3d_network()
    loss_fn = segmentation_loss(onehot_targets=False)
    expected = []
    for i in range(3):
        reference.zero_grad(set_to_none=True)
        loss_fn(reference(images[i : i + 1]), labels[i : i + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in reference.named_parameters()})

    model = _default_3d_network()
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        num_classes=2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=3,
        grad_sample_mode=mode,
        secure_mode=False,
    )
    losses = dp.per_sample_gradients(images, labels)
    assert per_sample_gradient_rows(dp.module) == 3
    with torch.no_grad():
        whole_batch = float(loss_fn(reference(images), labels))
        each = [float(loss_fn(reference(images[i : i + 1]), labels[i : i + 1])) for i in range(3)]
    assert float(losses.mean()) == pytest.approx(whole_batch, rel=1e-9)
    assert losses.tolist() == pytest.approx(each, rel=1e-9)
    for name, parameter in model.named_parameters():
        rows = parameter.grad_sample  # type: ignore[attr-defined]
        for i in range(3):
            torch.testing.assert_close(rows[i], expected[i][name], rtol=1e-7, atol=1e-10)


def _probe_step(
    losses: list[float], *, noise: float, grad_scale: float = 1e-6
) -> tuple[DPComponents, float]:
    """One step of a tiny DP set-up whose per-sample losses and gradients are given."""
    dp, model = _tiny_dp(noise, expected_batch_size=len(losses))
    dp.per_sample_gradients = _fixed(model, losses, grad_scale)
    images = torch.zeros(len(losses), 64)
    return dp, dp.step(images, torch.zeros(len(losses), dtype=torch.long))


def _fixed(
    model: nn.Linear, losses: list[float], grad_scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def gradients(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for parameter in model.parameters():
            rows = torch.full((len(losses), *parameter.shape), grad_scale)
            parameter.grad_sample = rows  # type: ignore[attr-defined]
        return torch.tensor(losses, dtype=torch.float64)

    return gradients


def test_the_loss_is_one_more_clipped_coordinate_of_the_dp_step() -> None:
    """Without noise the estimate is the mean clipped loss: a patient's loss of 40 counts as
    the clip bound 2, so no loss can say more about a patient than its clipped share."""
    _, estimate = _probe_step([0.5, 1.5, 40.0], noise=1e-12)
    assert estimate == pytest.approx((0.5 + 1.5 + 2.0) / 3, rel=1e-6)
    # Its sensitivity is bounded: the clipped vector holds it, and the gradient rows share the
    # clipping norm with it (a large gradient shrinks the loss coordinate with it).
    _, shrunk = _probe_step([2.0], noise=1e-12, grad_scale=10.0)
    assert 0 < shrunk < 2.0 * 0.05


def test_the_loss_estimate_carries_the_steps_noise() -> None:
    coordinate = LossCoordinate(clip=2.0, share=0.3, max_grad_norm=1.0)
    std = coordinate.step_std(noise_multiplier=1.0, expected_batch_size=4)
    assert std == pytest.approx(1.0 * 1.0 / (0.3 * 1.0 / 2.0 * 4))
    estimates = [_probe_step([1.0] * 4, noise=1.0)[1] for _ in range(200)]
    assert float(torch.tensor(estimates).std()) == pytest.approx(std, rel=0.2)


def test_a_patient_with_broken_data_changes_nothing_that_is_released() -> None:
    """A non-finite loss or gradient becomes a zero gradient and the loss bound: the step is
    taken like any other, so neither the step count nor any message depends on it."""
    dp, model = _tiny_dp(1e-12, expected_batch_size=3)
    losses = [0.5, math.nan, 1.0]

    def broken(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for parameter in model.parameters():
            rows = torch.ones((3, *parameter.shape)) * 1e-3
            rows[1] = math.inf
            parameter.grad_sample = rows  # type: ignore[attr-defined]
        return torch.tensor(losses, dtype=torch.float64)

    dp.per_sample_gradients = broken
    before = model.weight.detach().clone()
    estimate = dp.step(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)
    assert math.isfinite(estimate)
    assert estimate == pytest.approx((0.5 + 2.0 + 1.0) / 3, rel=1e-3)
