"""Exact per-sample gradient rules for the layers of medfed's networks, for Opacus' hooks mode.

Opacus' own rule for ``Conv2d``/``Conv3d`` unfolds every input patch (memory and time grow with
the kernel volume: 27x the activation for a 3x3x3 kernel), and it has no rule at all for
``ConvTranspose2d/3d`` and ``PReLU``, which then fall back to functorch and recompute each layer's
forward pass. The rules here use what the backward pass already holds:

- convolutions (plain and transposed): the weight gradient of a grouped convolution with one
  group per sample is exactly the stack of per-sample weight gradients, so a single
  ``aten.convolution_backward`` call gives them all without unfolding or a second forward pass;
- PReLU: ``d out / d a = min(x, 0)``, so each sample's gradient is one reduction.

They are registered with Opacus' public ``register_grad_sampler`` mechanism and therefore serve
every GradSampleModule in the process (hooks and ghost modes; functorch mode ignores them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_registered = False

GradSamples = dict[nn.Parameter, torch.Tensor]


def _channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return False


def _fold_batch_into_channels(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (1, B*C, *S)`` in ``x``'s own memory layout.

    A plain reshape of a channels-last tensor would copy it into the contiguous layout, and
    oneDNN convolutions with few channels are several times slower there.
    """
    batch, channels, *spatial = x.shape
    if not _channels_last(x):
        return x.reshape(1, batch * channels, *spatial)
    ndim = len(spatial)
    # Channels-last memory is (B, *S, C); one copy to (*S, B, C) makes B*C the innermost axis,
    # which is channels-last for the folded tensor.
    moved = x.permute(*range(2, 2 + ndim), 0, 1).contiguous()
    folded = moved.view(*spatial, batch * channels).unsqueeze(0)
    return folded.permute(0, ndim + 1, *range(1, ndim + 1))


def _explicit_padding(conv: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input as the convolution itself sees it, and the padding left to the kernel.

    ``padding="same"`` can be asymmetric and non-zero ``padding_mode``s pad before convolving;
    both are applied here exactly as ``nn.Conv*d`` does, leaving a zero-padding convolution.
    """
    if not isinstance(conv.padding, str) and conv.padding_mode == "zeros":
        return x, list(conv.padding)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    return padded, [0] * (x.dim() - 2)


def conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradients of a (transposed) convolution's weight and bias."""
    conv: Any = layer  # _ConvNd's attributes are not visible through nn.Module
    weight: nn.Parameter = conv.weight
    bias: nn.Parameter | None = conv.bias
    x = activations[0].to(backprops.dtype)
    batch = x.shape[0]
    out: GradSamples = {}
    if batch == 0:
        if weight.requires_grad:
            out[weight] = weight.new_zeros((0, *weight.shape))
        if bias is not None and bias.requires_grad:
            out[bias] = bias.new_zeros((0, *bias.shape))
        return out
    if weight.requires_grad:
        transposed = isinstance(layer, _TRANSPOSED)
        spatial = x.dim() - 2
        x, padding = (x, list(conv.padding)) if transposed else _explicit_padding(conv, x)
        # Only the weight's shape matters here (its gradient is not needed w.r.t. the input).
        grouped_weight = weight.detach().repeat(batch, *([1] * (weight.dim() - 1)))
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            _fold_batch_into_channels(backprops),
            _fold_batch_into_channels(x),
            grouped_weight,
            None,
            list(conv.stride),
            padding,
            list(conv.dilation),
            transposed,
            list(conv.output_padding) if transposed else [0] * spatial,
            conv.groups * batch,
            [False, True, False],
        )
        out[weight] = grad_weight.reshape(batch, *weight.shape)
    if bias is not None and bias.requires_grad:
        out[bias] = backprops.sum(dim=tuple(range(2, backprops.dim())))
    return out


def prelu_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradient of PReLU's slope(s): the sum of ``min(x, 0) * grad``."""
    prelu: Any = layer
    weight: nn.Parameter = prelu.weight
    x = activations[0].to(backprops.dtype)
    contribution = x.clamp(max=0) * backprops
    if weight.numel() == 1:
        grad = contribution.reshape(x.shape[0], -1).sum(dim=1)
    elif x.dim() > 2:
        grad = contribution.sum(dim=tuple(range(2, x.dim())))  # one slope per channel (dim 1)
    else:
        grad = contribution
    return {weight: grad.reshape(x.shape[0], *weight.shape)}


def register_grad_samplers() -> None:
    """Make Opacus' hooks mode use the rules above (idempotent; call before wrapping a model).

    Opacus decides at wrap time which layers get a rule and which fall back to functorch, so
    this must run before ``GradSampleModule``/``make_private``; :func:`build_model` calls it.
    """
    global _registered
    if _registered:
        return
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(list(_CONVS + _TRANSPOSED))(conv_grad_sample)
    register_grad_sampler(nn.PReLU)(prelu_grad_sample)
    _registered = True
