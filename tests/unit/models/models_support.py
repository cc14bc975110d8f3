"""Shared helpers for the model tests (imported by name; pytest puts this folder on sys.path)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from medfed.models import ModelSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_spec(spatial_dims: int = 3, **changes: object) -> ModelSpec:
    """The configuration's default network (channels 8/16/32, instance norm, 2 classes)."""
    fields: dict[str, object] = {
        "network": "unet",
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "out_channels": 2,
        "channels": (8, 16, 32),
        "strides": (2, 2),
        "num_res_units": 1,
        "norm": "instance",
    }
    fields.update(changes)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def dice_ce() -> LossFn:
    """The trainer's loss: per-sample Dice (batch=False) + CE, both means over the batch."""
    from monai.losses.dice import DiceCELoss

    loss: LossFn = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    return loss


def tiny_batch(
    spatial_dims: int,
    *,
    batch: int = 3,
    size: int = 16,
    classes: int = 2,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and integer labels (channel dim 1) for ``batch`` patients."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *([size] * spatial_dims))
    images = torch.randn(shape, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, shape, generator=generator)
    return images, labels


def reference_per_sample_grads(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """Per-sample gradients the slow, obviously right way: one backward pass per sample."""
    plain = copy.deepcopy(model)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in plain.named_parameters()}
    for index in range(images.shape[0]):
        plain.zero_grad(set_to_none=True)
        torch.autograd.backward(
            loss_fn(plain(images[index : index + 1]), labels[index : index + 1])
        )
        for name, parameter in plain.named_parameters():
            assert parameter.grad is not None, f"{name} got no gradient"
            rows[name].append(parameter.grad.detach().clone())
    return {name: torch.stack(grads) for name, grads in rows.items()}


def opacus_grad_samples(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn,
    *,
    mode: str,
    loss_reduction: str = "mean",
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients from Opacus' GradSampleModule on a copy of ``model``."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(
        copy.deepcopy(model),
        batch_first=True,
        loss_reduction=loss_reduction,
        strict=strict,
        force_functorch=mode == "functorch",
    )
    with warnings.catch_warnings():
        # Inputs do not require grad, so the first layer's full backward hook sees only outputs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        torch.autograd.backward(loss_fn(wrapped(images), labels))
    samples = {}
    for name, parameter in wrapped._module.named_parameters():
        grad_sample = getattr(parameter, "grad_sample", None)
        assert isinstance(grad_sample, torch.Tensor), f"{name}: no per-sample gradient"
        samples[name] = grad_sample.detach()
    return samples


def _prefixed(name: str) -> Callable[[str], str]:
    return lambda text: f"{name}: {text}"


def assert_same_grads(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    *,
    rtol: float = 1e-7,
    atol: float = 1e-10,
) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=_prefixed(name))
