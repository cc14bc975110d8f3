"""The training steps the DP-overhead benchmark times, and the check that each DP step is exact.

Every configuration is one closure: forward + loss + backward + optimizer step on a fixed batch.
``check_mode`` runs one noiseless DP step on a tiny float64 batch and compares the parameter
update with the clipped mean of per-sample gradients from one backward pass per sample.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from medfed.config import ModelSection
from medfed.models import ModelSpec, build_model
from medfed.site.dp import LossCoordinate, make_private, segmentation_loss

MODES = ("none", "hooks", "hooks-stock", "functorch", "ew", "ghost", "ghost-dicece", "vmap")
Step = Callable[[], None]


def default_spec(spatial_dims: int) -> ModelSpec:
    """The network a site gets with the default model section and two classes."""
    model = ModelSection()
    return ModelSpec(
        network=model.network,
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=2,
        channels=tuple(model.channels),
        strides=tuple(model.strides),
        num_res_units=model.num_res_units,
        norm=model.norm,
    )


def _registries() -> tuple[dict[Any, Any], dict[Any, Any]]:
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    stock = dict(GradSampleHooks.GRAD_SAMPLERS)  # before medfed registers its rules
    build_model(spec=default_spec(2))
    return stock, dict(GradSampleHooks.GRAD_SAMPLERS)


STOCK, MEDFED = _registries()


@contextlib.contextmanager
def rules(mode: str) -> Iterator[None]:
    """Opacus' own per-layer rules for hooks-stock, medfed's for everything else."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    registry = GradSampleHooks.GRAD_SAMPLERS
    registry.clear()
    registry.update(STOCK if mode == "hooks-stock" else MEDFED)
    try:
        yield
    finally:
        registry.clear()
        registry.update(MEDFED)


def loss_fn() -> nn.Module:
    """The trainer's loss (foreground Dice + cross-entropy, one term per example)."""
    return segmentation_loss(onehot_targets=False)


class PerSampleDiceCE(nn.Module):
    """DiceCE (batch=False) with a ``reduction`` that ghost clipping can set to "none".

    Opacus' ghost mode needs one loss per sample; MONAI's DiceCELoss ignores ``reduction`` and
    always returns the batch mean, which silently breaks ghost clipping's second pass.
    """

    def __init__(self) -> None:
        super().__init__()
        from monai.losses.dice import DiceLoss

        self.reduction = "mean"
        self.dice = DiceLoss(
            to_onehot_y=True, softmax=True, reduction="none", include_background=False
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dice: torch.Tensor = self.dice(logits, labels).flatten(1).mean(dim=1)
        ce = nn.functional.cross_entropy(logits, labels[:, 0].long(), reduction="none")
        per_sample = dice + ce.flatten(1).mean(dim=1)
        return per_sample if self.reduction == "none" else per_sample.mean()


def make_batch(dims: int, size: int, batch: int, dtype: torch.dtype, device: torch.device) -> Any:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 1, *([size] * dims))
    images = torch.randn(shape, generator=generator, dtype=dtype)
    labels = (torch.rand(shape, generator=generator) > 0.7).to(dtype)
    return images.to(device), labels.to(device)


def make_step(
    mode: str,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    noise: float,
    clip: float,
) -> Step:
    """One training step of ``model`` (already placed) in ``mode``; set-up happens here."""
    criterion = loss_fn()
    if mode == "none":

        def plain() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), labels).backward()
            optimizer.step()

        return plain
    if mode == "vmap":
        # The trainer's own implementation (medfed.site.dp), not a copy of it.
        dp = make_private(
            model=model,
            optimizer=optimizer,
            num_classes=2,
            noise_multiplier=noise,
            max_grad_norm=clip,
            expected_batch_size=images.shape[0],
            grad_sample_mode="vmap",
            secure_mode=False,
        )

        def vmap_step() -> None:
            dp.step(images, labels)

        return vmap_step
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=images.shape[0]
    )
    kwargs: dict[str, Any] = {
        "module": model,
        "optimizer": optimizer,
        "data_loader": loader,
        "noise_multiplier": noise,
        "max_grad_norm": clip,
        "poisson_sampling": False,
        "grad_sample_mode": {"hooks-stock": "hooks", "ghost-dicece": "ghost"}.get(mode, mode),
    }
    with rules(mode):
        if mode.startswith("ghost"):
            # MONAI's DiceCELoss ignores `reduction`, which ghost clipping sets to "none"
            # to get one loss per sample: with it, the clipped gradient is silently wrong.
            module, dp_opt, criterion, _ = PrivacyEngine().make_private(
                criterion=PerSampleDiceCE() if mode == "ghost" else criterion, **kwargs
            )
        else:
            module, dp_opt, _ = PrivacyEngine().make_private(**kwargs)

    def dp() -> None:
        with rules(mode):
            dp_opt.zero_grad(set_to_none=True)
            criterion(module(images), labels).backward()
            dp_opt.step()

    return dp


def check_mode(mode: str, dims: int, layout: torch.memory_format) -> float:
    """Largest relative error of one noiseless DP step against per-sample backward passes."""
    images, labels = make_batch(dims, 16, 3, torch.float64, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(spec=default_spec(dims)).to(torch.float64).to(memory_format=layout)
    reference = copy.deepcopy(model)
    rows = []
    losses = []
    for i in range(images.shape[0]):
        reference.zero_grad(set_to_none=True)
        loss = loss_fn()(reference(images[i : i + 1]), labels[i : i + 1])
        loss.backward()
        losses.append(float(loss))
        rows.append([p.grad.detach().clone() for p in reference.parameters()])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in row)) for row in rows])
    clip = float(norms.median()) * 0.7  # some samples clipped, some not
    if mode == "vmap":
        # medfed's step clips each patient's gradient together with its training loss, one
        # more coordinate of at most loss_share x clip (medfed.site.dp.LossCoordinate).
        coordinate = LossCoordinate(clip=2.0, share=0.3, max_grad_norm=clip)
        extra = torch.tensor([min(max(v, 0.0), 2.0) * coordinate.scale for v in losses])
        norms = torch.sqrt(norms.to(torch.float64) ** 2 + extra.to(torch.float64) ** 2)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [
        sum(f * row[j] for f, row in zip(factors, rows, strict=True)) / len(rows)
        for j in range(len(rows[0]))
    ]
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    make_step(mode, model, images, labels, sgd, noise=0.0, clip=clip)()
    # Relative to the largest expected entry: biases in front of InstanceNorm have a true
    # gradient of zero, so a per-tensor relative error would only compare rounding noise.
    scale = max(float(w.abs().max()) for w in expected)
    worst = 0.0
    for old, new, want in zip(before, model.parameters(), expected, strict=True):
        worst = max(worst, float((old - new.detach() - want).abs().max()) / scale)
    return worst
