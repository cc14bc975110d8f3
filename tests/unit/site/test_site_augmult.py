"""Augmentation multiplicity: K views of each sampled patient, averaged before clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from medfed.config import SiteConfig, load_site_config
from medfed.data.dataset import PatientDataset
from medfed.data.manifest import load_manifest
from medfed.data.synth import synthesize_site
from medfed.errors import PrivacyUnitError
from medfed.site import epochs
from medfed.site.dp import (
    DPComponents,
    check_one_example_per_patient,
    make_private,
    segmentation_loss,
)

PATCH = 8
LOSS_CLIP = 2.0
LOSS_SHARE = 0.3
CLIP = 1.05  # between the two test patients' norms (about 1.04 and 1.09)


def _network() -> nn.Module:
    from medfed.models import build_model, spec_from_config

    config = SiteConfig.model_validate(
        {"site_id": "t", "data": {"manifest": "m.csv", "patch_size": [PATCH] * 3}}
    )
    torch.manual_seed(0)
    return build_model(spec=spec_from_config(config)).to(torch.float64)


def _batch(patients: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    shape = (patients * views, 1, PATCH, PATCH, PATCH)
    images = torch.randn(shape, generator=generator, dtype=torch.float64)
    labels = (torch.rand(shape, generator=generator) > 0.6).long()
    return images, labels


def _expected_step(
    images: torch.Tensor, labels: torch.Tensor, *, views: int, clip: float
) -> tuple[dict[str, torch.Tensor], float, list[float]]:
    """p.grad, the loss estimate and each patient's clipping factor of one noise-free step,
    computed with one backward pass per view."""
    reference = _network()
    loss_fn = segmentation_loss(onehot_targets=False)
    per_view: list[dict[str, torch.Tensor]] = []
    losses: list[float] = []
    for row in range(images.shape[0]):
        reference.zero_grad(set_to_none=True)
        loss = loss_fn(reference(images[row : row + 1]), labels[row : row + 1])
        loss.backward()
        per_view.append({n: p.grad.detach().clone() for n, p in reference.named_parameters()})
        losses.append(float(loss.detach()))
    patients = images.shape[0] // views
    scale = LOSS_SHARE * clip / LOSS_CLIP
    summed = {name: torch.zeros_like(value) for name, value in per_view[0].items()}
    loss_sum = 0.0
    factors = []
    for patient in range(patients):
        rows = range(patient * views, (patient + 1) * views)
        mean = {n: sum(per_view[r][n] for r in rows) / views for n in summed}
        coordinate = min(max(sum(losses[r] for r in rows) / views, 0.0), LOSS_CLIP) * scale
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in mean.values()) + coordinate**2)
        factor = min(1.0, clip / (norm + 1e-6))  # Opacus' clipping factor
        factors.append(factor)
        for name in summed:
            summed[name] += factor * mean[name]
        loss_sum += factor * coordinate
    grads = {name: value / patients for name, value in summed.items()}
    return grads, loss_sum / patients / scale, factors


def _dp(mode: str, *, views: int, clip: float, patients: int) -> tuple[DPComponents, nn.Module]:
    model = _network()
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        num_classes=2,
        noise_multiplier=1e-300,  # noise far below the gradients' last bit
        max_grad_norm=clip,
        expected_batch_size=patients,
        grad_sample_mode=mode,  # type: ignore[arg-type]
        secure_mode=False,
        loss_clip=LOSS_CLIP,
        loss_share=LOSS_SHARE,
        augmentation_multiplicity=views,
    )
    return dp, model


@pytest.mark.parametrize("mode", ["vmap", "hooks", "functorch"])
def test_k_views_give_the_clipped_average_of_their_gradients(mode: str) -> None:
    views, patients = 3, 2
    images, labels = _batch(patients, views)
    expected, expected_loss, factors = _expected_step(images, labels, views=views, clip=CLIP)
    assert min(factors) < 1.0 == max(factors)  # one patient is clipped, the other is not

    dp, model = _dp(mode, views=views, clip=CLIP, patients=patients)
    estimate = dp.step(images, labels)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-7, atol=1e-12)
    assert estimate == pytest.approx(expected_loss, rel=1e-7)


def test_the_released_loss_is_per_patient_the_mean_of_its_views_then_clipped() -> None:
    """Losses [0.5, 1.5, 40] and [1, 1, 1]: the patients' means 14 and 1 are clipped to 2 and 1
    (clipping each view first would give a smaller first patient: (0.5 + 1.5 + 2) / 3)."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        num_classes=2,
        noise_multiplier=1e-12,
        max_grad_norm=1.0,
        expected_batch_size=2,
        grad_sample_mode="hooks",
        secure_mode=False,
        augmentation_multiplicity=3,
    )
    losses = [0.5, 1.5, 40.0, 1.0, 1.0, 1.0]

    def gradients(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        for parameter in model.parameters():
            parameter.grad_sample = torch.full((6, *parameter.shape), 1e-6)  # type: ignore[attr-defined]
        return torch.tensor(losses, dtype=torch.float64)

    dp.per_sample_gradients = gradients
    estimate = dp.step(torch.zeros(6, 64), torch.zeros(6, dtype=torch.long))
    assert estimate == pytest.approx((2.0 + 1.0) / 2, rel=1e-6)
    # A view count that does not divide the rows is refused, not averaged across patients.
    with pytest.raises(PrivacyUnitError, match="3 view"):
        dp.step(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long))


def test_views_of_a_patient_must_be_consecutive_and_patients_distinct() -> None:
    check_one_example_per_patient([4, 4, 4, 7, 7, 7], 6, views=3)
    check_one_example_per_patient([4, 7], 2)
    for rows in ([4, 4, 7, 7, 7, 4], [4, 4, 4, 4, 4, 4], [4, 4, 4, 7, 7]):
        with pytest.raises(PrivacyUnitError, match="view"):
            check_one_example_per_patient(rows, len(rows), views=3)


def test_a_step_draws_k_independent_views_of_each_sampled_patient(tmp_path: Path) -> None:
    """Through the real dataset and random pipeline: K rows per patient, different crops."""
    synthesize_site(out=tmp_path / "site", cases=5, size=16, seed=3)
    config = load_site_config(tmp_path / "site" / "site.yaml")
    data = config.data.model_copy(update={"patch_size": [8, 8, 8]})
    dataset = PatientDataset(load_manifest(config.data.manifest), data=data, seed=1)
    model = _network().to(torch.float32)
    dp = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        num_classes=2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=2,
        grad_sample_mode="vmap",
        secure_mode=False,
        augmentation_multiplicity=4,
    )
    seen: list[torch.Tensor] = []
    real: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dp.per_sample_gradients

    def recording(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return real(images, labels)

    dp.per_sample_gradients = recording
    loss = epochs._dp_step(dp, dataset, [1, 3], torch.device("cpu"))
    assert math.isfinite(loss)
    (images,) = seen
    assert images.shape[0] == 8
    for patient in range(2):
        views = images[4 * patient : 4 * (patient + 1)].reshape(4, -1)
        distinct = {tuple(row.tolist()) for row in views}
        assert len(distinct) > 1  # independent draws, not one view repeated
    # every parameter ends the step with one averaged row per patient
    rows = [p.grad_sample.shape[0] for p in model.parameters()]  # type: ignore[attr-defined]
    assert set(rows) == {2}
