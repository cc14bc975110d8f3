"""Opacus' per-sample gradients of medfed's networks equal one backward pass per sample.

This is what makes DP-SGD's clipping per patient: if any layer mixed samples (BatchNorm) or a
per-sample rule were wrong, the per-sample gradients would differ from single-sample passes.
Everything runs in float64 so that the tolerance can be tight.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models_support import (
    assert_same_grads,
    default_spec,
    dice_ce,
    opacus_grad_samples,
    reference_per_sample_grads,
    tiny_batch,
)
from torch import nn

from medfed.models import build_model, place_model
from medfed.models.grad_samplers import conv_grad_sample, register_grad_samplers


def _model(spec_dims: int, **changes: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(spec=default_spec(spec_dims, **changes)).to(torch.float64)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_default_network_per_sample_grads_match_single_sample_passes(
    spatial_dims: int, mode: str
) -> None:
    model = _model(spatial_dims)
    images, labels = tiny_batch(spatial_dims)
    expected = reference_per_sample_grads(model, images, labels, dice_ce())
    actual = opacus_grad_samples(model, images, labels, dice_ce(), mode=mode)
    assert_same_grads(actual, expected)
    # Every parameter is covered, and samples differ (a broadcast batch gradient would not).
    assert all(g.shape[0] == 3 for g in actual.values())
    conv = actual["model.0.conv.unit0.conv.weight"]
    assert not torch.allclose(conv[0], conv[1])


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_sum_reduction_and_channels_last_layout_are_exact_too(mode: str) -> None:
    spec = default_spec(3)
    model = place_model(model=_model(3), spec=spec, device=torch.device("cpu"))
    images, labels = tiny_batch(3, size=8)

    def ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target[:, 0], reduction="sum")

    expected = reference_per_sample_grads(model, images, labels, ce_sum)
    actual = opacus_grad_samples(model, images, labels, ce_sum, mode=mode, loss_reduction="sum")
    assert_same_grads(actual, expected)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_group_norm_and_attention_unet_per_sample_grads(mode: str) -> None:
    for model in (_model(2, norm="group"), _model(2, network="attention_unet")):
        images, labels = tiny_batch(2)
        expected = reference_per_sample_grads(model, images, labels, dice_ce())
        assert_same_grads(
            opacus_grad_samples(model, images, labels, dice_ce(), mode=mode), expected
        )


def test_the_comparison_catches_a_layer_that_mixes_samples() -> None:
    # BatchNorm normalises with batch statistics: each sample's gradient depends on the others.
    from monai.networks.nets.unet import UNet

    torch.manual_seed(0)
    mixing = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        norm=("batch", {"track_running_stats": False}),  # no buffers: Opacus accepts it
    ).to(torch.float64)
    images, labels = tiny_batch(2)
    expected = reference_per_sample_grads(mixing, images, labels, dice_ce())
    actual = opacus_grad_samples(mixing, images, labels, dice_ce(), mode="hooks", strict=False)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_grads(actual, expected)


def test_hooks_mode_uses_medfed_rules_instead_of_functorch_fallbacks() -> None:
    from opacus import GradSampleModule

    register_grad_samplers()
    wrapped = GradSampleModule(_model(3), batch_first=True, loss_reduction="mean")
    fallbacks = [
        type(m).__name__ for m in wrapped._module.modules() if hasattr(m, "ft_compute_sample_grad")
    ]
    assert fallbacks == []


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
        nn.ConvTranspose2d(4, 2, 3, stride=2, dilation=2, padding=2, output_padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Conv3d(4, 2, (1, 3, 3), dilation=(1, 2, 1), padding=(0, 2, 1)),
        nn.Conv2d(4, 2, 3, padding="same", padding_mode="reflect"),
        nn.PReLU(num_parameters=4),
    ],
    ids=lambda layer: type(layer).__name__,
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_rules_are_exact_for_other_settings(layer: nn.Module, channels_last: bool) -> None:
    register_grad_samplers()
    dims = 3 if "3d" in type(layer).__name__ else 2
    model = nn.Sequential(copy.deepcopy(layer))
    model = model.to(torch.float64)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn((3, 4, *([6] * dims)), generator=generator, dtype=torch.float64)
    if channels_last:
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]
        images = images.contiguous(memory_format=fmt)
    target = torch.randn(model(images).shape, generator=generator, dtype=torch.float64)

    def loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return ((out - tgt) ** 2).sum()

    expected = reference_per_sample_grads(model, images, target, loss)
    actual = opacus_grad_samples(model, images, target, loss, mode="hooks", loss_reduction="sum")
    assert_same_grads(actual, expected)


def test_conv_rule_handles_an_empty_batch() -> None:
    conv = nn.Conv3d(2, 4, 3, padding=1)
    grads = conv_grad_sample(conv, [torch.zeros(0, 2, 4, 4, 4)], torch.zeros(0, 4, 4, 4, 4))
    assert [tuple(g.shape) for g in grads.values()] == [(0, 4, 2, 3, 3, 3), (0, 4)]
