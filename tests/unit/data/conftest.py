"""Fixtures for the data tests: small NIfTI files written with nibabel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

NiftiWriter = Callable[..., Path]


def _write(
    path: Path, data: np.ndarray[Any, Any], affine: np.ndarray[Any, Any] | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture
def write_nifti() -> NiftiWriter:
    """``write_nifti(path, array, affine=None)`` saves a NIfTI file and returns its path."""
    return _write


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """``make_case(name, shape, spacing=1.0, label_values=(0, 1))``: a plausible image/label pair.

    The label holds a small block of the last label value in the middle of the volume.
    """

    def make(
        name: str,
        shape: tuple[int, ...] = (16, 16, 16),
        spacing: float = 1.0,
        label_values: tuple[int, int] = (0, 1),
        seed: int = 0,
    ) -> tuple[Path, Path]:
        rng = np.random.default_rng(seed)
        image = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
        label = np.full(shape, label_values[0], dtype=np.uint8)
        centre = tuple(slice(max(0, n // 2 - 2), n // 2 + 2) for n in shape)
        label[centre] = label_values[1]
        image[label == label_values[1]] += 80.0
        affine = np.diag([spacing] * 3 + [1.0])
        return (
            _write(tmp_path / "images" / f"{name}.nii.gz", image, affine),
            _write(tmp_path / "labels" / f"{name}.nii.gz", label, affine),
        )

    return make
