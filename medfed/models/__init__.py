"""Segmentation networks for DP-SGD: spec, factory, checkpoints and device choice.

MONAI is imported only when a network is built, so importing this package stays cheap.
"""

from medfed.models.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from medfed.models.device import resolve_device
from medfed.models.factory import build_model, memory_format_for, place_model
from medfed.models.grad_samplers import register_grad_samplers
from medfed.models.spec import ModelSpec, spec_from_config

__all__ = [
    "LoadedCheckpoint",
    "ModelSpec",
    "build_model",
    "load_checkpoint",
    "memory_format_for",
    "place_model",
    "register_grad_samplers",
    "resolve_device",
    "save_checkpoint",
    "spec_from_config",
]
