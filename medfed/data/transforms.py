"""MONAI transform pipelines: a deterministic, cacheable part and a random part.

Deterministic (once per case): load with nibabel, channel first, reorient to RAS, resample when
``data.spacing`` is set (bilinear image, nearest label), scale intensities to [0, 1] between the
0.5th and 99.5th percentile of each volume (so sites with different scanners and intensity scales
meet on one range), pad to at least ``patch_size`` and map label values to class indices
``0..K-1`` in the order of ``data.classes``. The output holds plain tensors: image float32
``[1, *spatial]``, label uint8 ``[1, *spatial]`` (int16 beyond 256 classes).

Random (every time a patient is drawn): exactly ONE crop of ``patch_size`` per patient, chosen
half the time around foreground, then light augmentation. A crop transform with
``num_samples > 1`` would turn one sampled patient into several DP-SGD examples and multiply
the privacy cost; :class:`medfed.data.dataset.PatientDataset` refuses such pipelines. With
``training.augmentation_multiplicity`` K, a DP step draws a sampled patient K times through this
pipeline (K independent views, each one crop) and averages the views' gradients before clipping,
so the patient is still one clipped example (:mod:`medfed.site.dp`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import RandCropByPosNegLabeld, SpatialPadd
from monai.transforms.intensity.dictionary import (
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd, Spacingd
from monai.transforms.transform import MapTransform
from monai.transforms.utility.dictionary import EnsureChannelFirstd, EnsureTyped

from medfed.config.site import DataSection
from medfed.errors import DataError

KEYS = ("image", "label")
LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.5
# bump when the deterministic pipeline changes, so on-disk caches of the old one are not reused
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class TrainTransforms:
    """The two halves of the training pipeline."""

    deterministic: Compose
    random: Compose


class SqueezeToDimsd(MapTransform):
    """Drop trailing singleton axes until the data has ``spatial_dims`` spatial axes.

    A 2D slice is often stored as an ``X x Y x 1`` NIfTI, and 3D volumes sometimes carry a
    singleton fourth axis; anything else of the wrong dimensionality is a :class:`DataError`.
    """

    def __init__(self, keys: Sequence[str], *, spatial_dims: int) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            value = result[key]
            while value.ndim - 1 > self.spatial_dims and value.shape[-1] == 1:
                value = value.squeeze(-1)
            if value.ndim - 1 != self.spatial_dims:
                raise DataError(
                    f"{key} has spatial shape {tuple(value.shape[1:])}, expected "
                    f"{self.spatial_dims}-D data (patch_size has {self.spatial_dims} entries)",
                    hint="run `medfed data check` and compare patch_size with the data",
                )
            result[key] = value
        return result


class ClassIndicesd(MapTransform):
    """Map label values to class indices (``classes[i]`` becomes ``i``); reject other values."""

    def __init__(self, keys: Sequence[str], *, classes: Sequence[int]) -> None:
        super().__init__(keys)
        self.classes = [int(c) for c in classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        for key in self.key_iterator(result):
            result[key] = to_class_indices(torch.as_tensor(result[key]), self.classes)
        return result


def to_class_indices(label: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Class index per voxel; :class:`DataError` for values not in ``classes``."""
    values = torch.unique(label)
    unknown = [v for v in values.tolist() if v not in classes]
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:10])
        raise DataError(
            f"label values [{shown}] are not in classes {list(classes)}",
            hint="fix data.classes in the site config or the label files; `medfed data check` "
            "lists every case",
        )
    dtype = torch.uint8 if len(classes) <= 256 else torch.int16
    indices = torch.zeros(label.shape, dtype=dtype)
    for index, value in enumerate(classes):
        if index:
            indices[label == value] = index
    return indices


def preprocess_transforms(data: DataSection) -> Compose:
    """The deterministic pipeline (shared by training and validation)."""
    dims = len(data.patch_size)
    steps: list[Any] = [
        LoadImaged(keys=list(KEYS), reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=list(KEYS)),
        SqueezeToDimsd(KEYS, spatial_dims=dims),
        Orientationd(keys=list(KEYS), axcodes="RAS"[:dims], labels=None),
    ]
    if data.spacing is not None:
        steps.append(
            Spacingd(keys=list(KEYS), pixdim=list(data.spacing), mode=("bilinear", "nearest"))
        )
    steps += [
        ScaleIntensityRangePercentilesd(
            keys="image",
            lower=LOWER_PERCENTILE,
            upper=UPPER_PERCENTILE,
            b_min=0.0,
            b_max=1.0,
            clip=True,
            channel_wise=True,
        ),
        # after scaling, so that padding (0) reads as the darkest tissue rather than mid-grey
        SpatialPadd(keys=list(KEYS), spatial_size=list(data.patch_size), mode="constant"),
        EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", data_type="tensor", track_meta=False),
        ClassIndicesd(["label"], classes=data.classes),
    ]
    return Compose(steps)


def augment_transforms(data: DataSection) -> Compose:
    """The random pipeline: one patch-size crop per patient, random flips, mild intensity jitter."""
    dims = len(data.patch_size)
    steps: list[Any] = [
        RandCropByPosNegLabeld(
            keys=list(KEYS),
            label_key="label",
            spatial_size=list(data.patch_size),
            pos=1.0,
            neg=1.0,
            num_samples=1,  # the privacy unit is the patient: one example per draw
            allow_smaller=False,
        )
    ]
    steps += [RandFlipd(keys=list(KEYS), prob=0.5, spatial_axis=axis) for axis in range(dims)]
    steps += [
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ]
    return Compose(steps)


def train_transforms(data: DataSection) -> TrainTransforms:
    """Deterministic (cacheable) and random halves of the training pipeline."""
    return TrainTransforms(
        deterministic=preprocess_transforms(data), random=augment_transforms(data)
    )


def val_transforms(data: DataSection) -> Compose:
    """Whole preprocessed volumes (at least ``patch_size``) for sliding-window evaluation."""
    return preprocess_transforms(data)


def pipeline_signature(data: DataSection) -> str:
    """Text that changes whenever the deterministic pipeline's output could change."""
    return (
        f"v{PIPELINE_VERSION};classes={data.classes};patch={data.patch_size};"
        f"spacing={data.spacing};pct={LOWER_PERCENTILE},{UPPER_PERCENTILE}"
    )


def declared_samples(transform: Any) -> int:
    """The largest ``num_samples`` any (nested) transform declares; 1 when none does."""
    found = 1
    for candidate in (transform, getattr(transform, "cropper", None)):
        value = getattr(candidate, "num_samples", None)
        if isinstance(value, int):
            found = max(found, value)
    for inner in getattr(transform, "transforms", ()) or ():
        found = max(found, declared_samples(inner))
    return found
