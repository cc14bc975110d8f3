"""Canary patients for a privacy audit: synthetic cases in the site's own geometry, never real.

The canaries are written by :func:`medfed.data.synthesize_site` (NIfTI image and label pairs of
the site's dimensionality, sized to its patch) into a scratch directory, with a seed the audit
draws from OS entropy, and then read through the site's own preprocessing and crop pipeline.
For the black-box (loss) score every label is mirrored along all spatial axes, so that a
canary's lesion mask no longer matches what its image shows: only a network that saw the
canary itself can predict it, which is what a membership score looks for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfed.config.site import DataSection, SiteConfig
from medfed.data.manifest import Case, load_manifest
from medfed.data.synth import MIN_SIZE, synthesize_site

CANARY_SITE_ID = "canaries"
# Synthetic labels hold the classes 0 and 1; the site's network has one output per site class.
CANARY_CLASSES = (0, 1)


def canary_size(config: SiteConfig) -> int:
    """The edge of the (cubic or square) canary volumes: the site's largest patch edge."""
    return max(MIN_SIZE, *config.data.patch_size)


def write_canaries(
    *, config: SiteConfig, count: int, directory: Path, seed: int, mislabel: bool
) -> list[Case]:
    """Write ``count`` canary patients under ``directory`` and return them in canary order."""
    written = synthesize_site(
        out=directory,
        cases=count,
        size=canary_size(config),
        seed=seed,
        spatial_dims=config.spatial_dims,
        site_id=CANARY_SITE_ID,
    )
    cases = load_manifest(written.manifest)
    if mislabel:
        cases = [_mirrored_label(case, directory / "mislabels") for case in cases]
    return cases


def _mirrored_label(case: Case, directory: Path) -> Case:
    directory.mkdir(parents=True, exist_ok=True)
    source = nib.load(case.label)
    assert isinstance(source, nib.Nifti1Image)  # synthesize_site writes NIfTI-1
    mirrored = np.ascontiguousarray(np.flip(np.asarray(source.dataobj)))
    image = nib.Nifti1Image(mirrored, source.affine)  # type: ignore[no-untyped-call]
    target = directory / case.label.name
    nib.save(image, target)
    return Case(patient_id=case.patient_id, image=case.image, label=target, split=case.split)


def canary_data_section(config: SiteConfig, *, manifest: Path) -> DataSection:
    """The site's data settings for the canaries: its patch, spacing and checks, no cache.

    Nothing of the audit is cached in the site's cache directory, and the canaries' labels
    are read as the two synthetic classes (a subset of the site's class indices).
    """
    return config.data.model_copy(
        update={
            "manifest": manifest,
            "classes": list(CANARY_CLASSES),
            "cache_dir": None,
        }
    )


def first_patch(patch_size: Sequence[int]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A crop to the patch at the volume's first corner, for canaries whose images go unused.

    The gradient score replaces every canary's gradient, so its image never reaches the
    network; one cheap deterministic crop keeps each sampled canary one patch-sized example
    without the cost of the random augmentation (most of a step's time on the CPU).
    """
    window = (slice(None), *(slice(0, size) for size in patch_size))

    def crop(item: dict[str, Any]) -> dict[str, Any]:
        return {"image": item["image"][window], "label": item["label"][window]}

    return crop


def included_cases(cases: Sequence[Case], members: Sequence[bool]) -> list[Case]:
    """The canaries the inclusion draw put into the training data, in canary order."""
    return [case for case, member in zip(cases, members, strict=True) if member]
