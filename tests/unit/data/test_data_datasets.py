"""MONAI pipelines and the per-patient datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandCropByPosNegLabeld
from torch.utils.data import DataLoader

from medfed.config.loading import load_site_config
from medfed.config.site import DataSection
from medfed.data import (
    Case,
    PatientDataset,
    ValidationDataset,
    build_datasets,
    load_manifest,
    synthesize_site,
    train_transforms,
)
from medfed.errors import DataError, PrivacyUnitError

CaseMaker = Callable[..., tuple[Path, Path]]


def _data(patch: list[int], **extra: Any) -> DataSection:
    return DataSection(manifest=Path("unused.csv"), patch_size=patch, **extra)


@pytest.fixture
def odd_cases(make_case: CaseMaker) -> list[Case]:
    """Odd, anisotropic shapes at 1.3 mm: one larger and one smaller than the patch."""
    return [
        Case("big", *make_case("big", (19, 27, 13), spacing=1.3, label_values=(0, 2))),
        Case("small", *make_case("small", (9, 7, 11), spacing=1.3, label_values=(0, 2), seed=1)),
        Case("plain", *make_case("plain", (16, 16, 16), label_values=(0, 2), seed=2)),
    ]


def test_training_items_are_one_patch_per_patient(odd_cases: list[Case]) -> None:
    data = _data([16, 16, 16], spacing=[1.0, 1.0, 1.0], classes=[0, 2])
    dataset = PatientDataset(odd_cases, data=data, seed=3)
    assert len(dataset) == 3
    for index in range(len(dataset)):
        for _ in range(3):
            item = dataset[index]
            assert isinstance(item, dict) and set(item) == {"image", "label", "patient"}
            assert item["patient"] == index
            assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
            assert item["label"].shape == (1, 16, 16, 16) and item["label"].dtype == torch.int64
            assert type(item["image"]) is torch.Tensor
            assert set(item["label"].unique().tolist()) <= {0, 1}  # value 2 became class 1
            assert item["image"].min() >= -0.1 and item["image"].max() <= 1.2
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["patient"].tolist() == [0, 1, 2]
    assert batch["image"].shape == (3, 1, 16, 16, 16)


def test_validation_items_are_whole_padded_volumes(odd_cases: list[Case]) -> None:
    data = _data([16, 16, 16], spacing=[1.0, 1.0, 1.0], classes=[0, 2])
    dataset = ValidationDataset(odd_cases, data=data)
    big = dataset[0]
    # 19x27x13 voxels of 1.3 mm span 23.4x33.8x15.6 mm between voxel centres: 24x35x17 at 1 mm
    assert big["image"].shape == (1, 24, 35, 17) and big["label"].shape == (1, 24, 35, 17)
    small = dataset[1]
    assert small["image"].shape == (1, 16, 16, 16)
    assert small["label"].shape == small["image"].shape and small["label"].dtype == torch.int64
    assert small["label"].sum() > 0 and small["patient"] == 1


def test_crops_are_seedable(odd_cases: list[Case]) -> None:
    data = _data([8, 8, 8], classes=[0, 2])

    def draws(seed: int) -> list[torch.Tensor]:
        dataset = PatientDataset(odd_cases, data=data, seed=seed)
        return [dataset[i % 3]["image"] for i in range(6)]

    first, again, other = draws(11), draws(11), draws(12)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_several_samples_per_patient_are_refused(odd_cases: list[Case]) -> None:
    data = _data([8, 8, 8], classes=[0, 2])
    two_crops = Compose(
        [
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=[8, 8, 8], num_samples=2
            )
        ]
    )
    with pytest.raises(PrivacyUnitError, match="2 samples per patient"):
        PatientDataset(odd_cases, data=data, random_transform=two_crops)

    plain = train_transforms(data).random

    def sneaky(sample: dict[str, Any]) -> Any:
        return plain(sample) + plain(sample)  # two crops, no num_samples attribute to see

    dataset = PatientDataset(odd_cases, data=data, random_transform=sneaky)
    with pytest.raises(PrivacyUnitError, match="yielded 2 samples"):
        dataset[0]


def test_duplicate_patients_are_refused(odd_cases: list[Case]) -> None:
    twice = [*odd_cases, Case("big", odd_cases[1].image, odd_cases[1].label)]
    with pytest.raises(PrivacyUnitError, match="patient ids listed more than once: big"):
        PatientDataset(twice, data=_data([8, 8, 8], classes=[0, 2]))
    shared = [*odd_cases, Case("other", odd_cases[1].image, odd_cases[1].label)]
    with pytest.raises(PrivacyUnitError, match="image files listed more than once"):
        PatientDataset(shared, data=_data([8, 8, 8], classes=[0, 2]))


def test_bad_label_values_name_the_patient(odd_cases: list[Case]) -> None:
    dataset = PatientDataset(odd_cases, data=_data([8, 8, 8], classes=[0, 1]))
    with pytest.raises(DataError, match=r"patient big .*label values \[2\] are not in classes"):
        dataset[0]
    missing = Case("gone", odd_cases[0].image.with_name("gone.nii.gz"), odd_cases[0].label)
    with pytest.raises(DataError, match=r"patient gone .*cannot be preprocessed"):
        ValidationDataset([missing], data=_data([8, 8, 8], classes=[0, 2]))[0]


def test_build_datasets_two_d_with_disk_cache(tmp_path: Path) -> None:
    made = synthesize_site(out=tmp_path / "site", cases=5, size=16, seed=4, spatial_dims=2)
    config = load_site_config(made.config)
    sets = build_datasets(config)
    assert len(sets.train) == made.n_train and len(sets.val) == made.n_val
    assert [c.split for c in sets.train_cases] == ["train"] * made.n_train
    item = sets.train[0]
    assert item["image"].shape == (1, 16, 16) and item["label"].shape == (1, 16, 16)
    first = sets.val[0]
    cached = sorted((config.cache_dir / "preprocessed").glob("*.npz"))
    assert len(cached) == 2  # one training and one validation case read so far

    cached[0].write_bytes(b"damaged")
    again = build_datasets(config)
    again.train.preload()
    again.val.preload()
    assert len(list((config.cache_dir / "preprocessed").glob("*.npz"))) == 5
    assert torch.equal(again.val[0]["image"], first["image"])
    assert torch.equal(again.val[0]["label"], first["label"])


def test_sites_with_different_intensity_scales_meet_on_one_range(tmp_path: Path) -> None:
    # Sites differ in scale and offset (harmonised here) and, by design, in lesion contrast and
    # load (not harmonised): so the healthy tissue is what must land on one range.
    raw_ranges, tissue_medians = [], []
    for shift in (-1.0, 2.0):
        made = synthesize_site(
            out=tmp_path / f"s{shift}", cases=3, size=16, seed=0, site_shift=shift
        )
        case = load_manifest(made.manifest)[0]
        raw = nib.load(case.image).get_fdata()
        raw_ranges.append(float(raw.max() - raw.min()))
        data = load_site_config(made.config).data
        volume = ValidationDataset([case], data=data)[0]
        image, label = volume["image"], volume["label"]
        assert float(image.min()) == 0.0 and float(image.max()) == 1.0
        tissue = image[(label == 0) & (image > 0.15)]  # inside the body, outside lesions
        tissue_medians.append(float(tissue.median()))
        assert float(image[label > 0].mean()) > 2 * tissue_medians[-1]  # lesions stand out
    assert raw_ranges[1] > 2 * raw_ranges[0]  # the raw sites really differ
    assert abs(tissue_medians[0] - tissue_medians[1]) < 0.1


def test_singleton_axes_and_negative_cases(
    tmp_path: Path, write_nifti: Callable[..., Path], recwarn: pytest.WarningsRecorder
) -> None:
    rng = np.random.default_rng(0)
    slice_label = np.zeros((20, 11, 1), np.uint8)
    slice_label[3:6, 3:6] = 1
    flat = Case(
        "slice",
        write_nifti(tmp_path / "i2.nii.gz", rng.random((20, 11, 1), dtype=np.float32)),
        write_nifti(tmp_path / "l2.nii.gz", slice_label),
    )
    item = PatientDataset([flat], data=_data([16, 16]))[0]
    assert item["image"].shape == (1, 16, 16) and item["label"].sum() > 0

    channel = Case(
        "channel",
        write_nifti(tmp_path / "i4.nii.gz", rng.random((20, 11, 7, 1), dtype=np.float32)),
        write_nifti(tmp_path / "l4.nii.gz", np.zeros((20, 11, 7, 1), np.uint8)),
    )
    dataset = PatientDataset([channel], data=_data([8, 8, 8]))
    assert dataset[0]["image"].shape == (1, 8, 8, 8) and dataset[0]["label"].sum() == 0
    assert not [w for w in recwarn if "foreground" in str(w.message)]
    with pytest.raises(DataError, match="expected 2-D data"):
        PatientDataset([channel], data=_data([8, 8]))[0]


def test_package_exports_resolve() -> None:
    import medfed.data

    for name in medfed.data.__all__:
        assert getattr(medfed.data, name) is not None
    with pytest.raises(AttributeError):
        _ = medfed.data.no_such_name  # type: ignore[attr-defined]
