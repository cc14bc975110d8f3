"""Helpers shared by the site tests: a site config, a round request, a small NIfTI dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfed.config.site import SiteConfig
from medfed.envelope import RoundRequest


def policy_site(tmp_path: Path, **policy: Any) -> SiteConfig:
    """A site with ``policy`` whose manifest does not exist: a check that read data would fail."""
    return SiteConfig.model_validate(
        {
            "site_id": "site-a",
            "data": {"manifest": str(tmp_path / "missing" / "manifest.csv")},
            "paths": {"workdir": str(tmp_path / "work")},
            "policy": policy,
        }
    )


def round_request(**changes: Any) -> RoundRequest:
    """Round 1 of a three-round run of the default UNet, with ``changes``."""
    values: dict[str, Any] = {
        "run_name": "study",
        "project": "default",
        "round": 1,
        "planned_rounds": 3,
        "model": {"network": "unet"},
        "local_epochs": 2,
        "learning_rate": None,
        "noise_multiplier": None,
        "max_grad_norm": None,
        "proximal_mu": 0.0,
        "seed": 0,
        "ledger_known": 0,
        "weights": None,
    }
    values.update(changes)
    return RoundRequest(**values)


def write_dataset(directory: Path, *, cases: int) -> Path:
    """``cases`` 16^3 NIfTI images with a cubic lesion each, and their manifest."""
    rows = ["patient_id,image,label"]
    for dirname in ("images", "labels"):
        (directory / dirname).mkdir(parents=True)
    for index in range(cases):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:9, 5:10, 6:11] = 1
        image = np.random.default_rng(index).normal(size=label.shape).astype(np.float32) + label
        name = f"p{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), directory / "images" / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), directory / "labels" / name)
        rows.append(f"p{index:02d},images/{name},labels/{name}")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def no_gpu() -> str | None:
    return None
