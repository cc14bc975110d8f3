"""Validation Dice of a segmentation network over whole preprocessed volumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from medfed.models.checkpoint import unwrap


class Volumes(Protocol):
    """Indexable whole-volume items: ``{"image": [C, *S], "label": [1, *S], ...}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def evaluate_dice(
    *,
    model: nn.Module,
    dataset: Volumes,
    patch_size: Sequence[int],
    num_classes: int,
    device: torch.device,
) -> float:
    """Mean foreground Dice over the validation volumes, by sliding-window inference.

    Returns NaN for an empty validation set, so a missing validation split is visible rather
    than silently reported as perfect or zero.
    """
    scores = per_patient_dice(
        model=model, dataset=dataset, patch_size=patch_size, num_classes=num_classes, device=device
    )
    return sum(scores) / len(scores) if scores else float("nan")


@torch.no_grad()
def per_patient_dice(
    *,
    model: nn.Module,
    dataset: Volumes,
    patch_size: Sequence[int],
    num_classes: int,
    device: torch.device,
) -> list[float]:
    """Each validation patient's foreground Dice (mean over the foreground classes)."""
    from monai.inferers.utils import sliding_window_inference
    from monai.metrics.meandice import DiceMetric
    from monai.networks.utils import one_hot

    if len(dataset) == 0:
        return []
    network = unwrap(model)
    was_training = network.training
    network.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    try:
        for index in range(len(dataset)):
            item = dataset[index]
            image = torch.as_tensor(item["image"]).unsqueeze(0).to(device)
            label = torch.as_tensor(item["label"]).unsqueeze(0).to(device).long()
            logits = sliding_window_inference(
                image, roi_size=list(patch_size), sw_batch_size=4, predictor=network, overlap=0.25
            )
            assert isinstance(logits, torch.Tensor)
            prediction = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=num_classes)
            metric(y_pred=prediction, y=one_hot(label, num_classes=num_classes))
        result = metric.aggregate()
        assert isinstance(result, torch.Tensor)
        return [float(value) for value in result.to(torch.float64).mean(dim=1)]
    finally:
        network.train(was_training)
