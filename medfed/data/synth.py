"""Synthetic sites: NIfTI image/label pairs that look enough like scans to train and test on.

Two tasks. ``shapes`` (the default, no extra packages): each case has a smooth "body" with
low-frequency texture and an inner organ, one or more bright ellipsoid lesions (label 1), a
multiplicative bias field and Gaussian noise. ``site_shift`` and ``seed`` change the intensity
scale and offset, the noise level and the lesion size and count, so several synthetic sites
form a non-IID federation. Shapes and voxel spacings vary a little per case so that resampling
and padding are exercised. Output is byte-for-byte reproducible: the generator is seeded per
case and nibabel writes gzip headers with a zero timestamp. ``brain``: tissue segmentation
(gray and white matter) of the MNI152 template that nilearn ships, deformed per patient, with
scanner-like intensity differences per site (:mod:`medfed.data.brain`; the ``brain`` extra).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydantic import ValidationError

from medfed.config.loading import dump_site_config
from medfed.config.site import (
    DataSection,
    PathsSection,
    PolicySection,
    PrivacySection,
    ReleaseSection,
    SiteConfig,
    TrainingSection,
)
from medfed.errors import ConfigError, DataError

_Array = np.ndarray[Any, np.dtype[np.float64]]
SynthTask = Literal["shapes", "brain"]

MIN_CASES = 3
MIN_SIZE = 8
VAL_SHARE = 0.2
# The generated site.yaml: enough DP-SGD steps to learn, one default run spending 90% of the
# cap (the site computes the noise for it from the patient count it releases).
DEFAULT_EPOCHS = 15
DEFAULT_BATCH = 4
DEFAULT_CAP = 8.0
DEFAULT_DELTA = 1e-5
DEFAULT_RUN_SHARE = 0.9
SYNTHETIC_REASON = "synthetic data written by medfed data synth: no real patients"


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize_site` wrote."""

    out: Path
    manifest: Path
    config: Path
    site_id: str
    patient_ids: tuple[str, ...]
    n_train: int
    n_val: int
    spatial_dims: int
    patch_size: tuple[int, ...]


@dataclass(frozen=True)
class _SiteStyle:
    """Per-site acquisition differences (the non-IID part)."""

    scale: float
    offset: float
    noise: float
    contrast: float
    lesion_scale: float
    lesion_rate: float
    bias: float


def synthesize_site(
    *,
    out: Path,
    cases: int,
    size: int,
    seed: int,
    site_shift: float = 0.0,
    spatial_dims: int = 3,
    site_id: str | None = None,
    overwrite: bool = False,
    task: SynthTask = "shapes",
) -> SynthResult:
    """Write a synthetic site dataset and a ready-to-use ``site.yaml`` under ``out``.

    Layout: ``images/case_XXX.nii.gz`` (float32), ``labels/case_XXX.nii.gz`` (uint8, classes
    0 and 1; the brain task's 0, 1 gray and 2 white matter), ``manifest.csv`` with an explicit
    split (about 20% validation, at least one validation and two training cases) and
    ``site.yaml`` whose paths are relative to ``out``. Refuses a non-empty ``out`` unless
    ``overwrite`` (then only earlier case files are removed). The brain task is 3-D, at least
    16 voxels a side, and needs nilearn.
    """
    if task not in ("shapes", "brain"):
        raise DataError(f"unknown task {task!r}", hint="use --task shapes or --task brain")
    if task == "brain":
        from medfed.data.brain import MIN_BRAIN_SIZE, check_nilearn

        if spatial_dims != 3 or size < MIN_BRAIN_SIZE:
            raise DataError(
                f"the brain task makes 3-D volumes of at least {MIN_BRAIN_SIZE} voxels a side, "
                f"not {spatial_dims}-D of {size}",
                hint=f"use --dims 3 and --size {MIN_BRAIN_SIZE} or more with --task brain",
            )
        check_nilearn()
    if spatial_dims not in (2, 3):
        raise DataError(
            f"spatial_dims must be 2 or 3, got {spatial_dims}", hint="use --dims 2 or 3"
        )
    if cases < MIN_CASES:
        raise DataError(
            f"need at least {MIN_CASES} cases for a train/val split, got {cases}",
            hint=f"use --cases {MIN_CASES} or more",
        )
    if size < MIN_SIZE:
        raise DataError(
            f"size must be at least {MIN_SIZE} voxels, got {size}", hint="use --size 16 or more"
        )
    out = Path(out).expanduser()
    site = site_id or _default_site_id(out, seed)
    n_val = max(1, min(cases - 2, round(VAL_SHARE * cases)))
    config = _site_config(site, size=size, spatial_dims=spatial_dims, seed=seed, task=task)
    _prepare_out(out, overwrite=overwrite)

    make_case = _case_maker(task, size=size, spatial_dims=spatial_dims, seed=seed, shift=site_shift)
    val_indices = set(np.random.default_rng([seed, 7919]).permutation(cases)[:n_val].tolist())
    rows: list[tuple[str, str, str, str]] = []
    for index in range(cases):
        rng = np.random.default_rng([seed, index])
        image, label, affine = make_case(rng)
        name = f"case_{index:03d}.nii.gz"
        _save(image.astype(np.float32), affine, out / "images" / name)
        _save(label, affine, out / "labels" / name)
        split = "val" if index in val_indices else "train"
        rows.append((f"{site}-p{index:03d}", f"images/{name}", f"labels/{name}", split))

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "image", "label", "split"])
        writer.writerows(rows)
    config_path = out / "site.yaml"
    dump_site_config(config, config_path)
    return SynthResult(
        out=out,
        manifest=manifest,
        config=config_path,
        site_id=site,
        patient_ids=tuple(row[0] for row in rows),
        n_train=cases - n_val,
        n_val=n_val,
        spatial_dims=spatial_dims,
        patch_size=tuple(config.data.patch_size),
    )


_Case = tuple[_Array, np.ndarray[Any, np.dtype[np.uint8]], _Array]


def _case_maker(
    task: SynthTask, *, size: int, spatial_dims: int, seed: int, shift: float
) -> Callable[[np.random.Generator], _Case]:
    if task == "brain":
        from medfed.data.brain import brain_case, brain_style

        brain = brain_style(seed, shift)
        return lambda rng: brain_case(rng, size=size, style=brain)
    style = _site_style(seed, shift)
    return lambda rng: _make_case(rng, size=size, spatial_dims=spatial_dims, style=style)


def _default_site_id(out: Path, seed: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", out.name).strip("-._")[:63]
    return name if name else f"synth-{seed}"


def _site_config(
    site: str, *, size: int, spatial_dims: int, seed: int, task: SynthTask
) -> SiteConfig:
    # multiples of 8 let the default UNet (and one more down-sampling level) divide the patch
    patch = max(MIN_SIZE, min(size, 32) // 8 * 8)
    # A synthetic brain keeps its own voxels (a whole head on the grid); shapes are resampled.
    classes, spacing = ([0, 1, 2], None) if task == "brain" else ([0, 1], [1.25] * spatial_dims)
    try:
        return SiteConfig(
            site_id=site,
            data=DataSection(
                manifest=Path("manifest.csv"),
                classes=classes,
                patch_size=[patch] * spatial_dims,
                spacing=spacing,
            ),
            training=TrainingSection(epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH, seed=seed),
            privacy=PrivacySection(
                target_epsilon_per_round=DEFAULT_RUN_SHARE * DEFAULT_CAP,
                epsilon_cap=DEFAULT_CAP,
                delta=DEFAULT_DELTA,
            ),
            paths=PathsSection(workdir=Path(".medfed")),
            # One local run may spend most of the cap here; a hospital's site init keeps the
            # default limit of a quarter of it per round.
            policy=PolicySection(max_epsilon_per_round=DEFAULT_CAP),
            # Nobody's data: the counts and the Dice of synthetic cases may be shown as they are.
            release=ReleaseSection(
                patient_counts="public", validation_dice="public", public_reason=SYNTHETIC_REASON
            ),
        )
    except ValidationError:
        raise ConfigError(
            f"{site!r} is not a valid site id",
            hint="use letters, digits, '.', '_' or '-' (at most 63 characters)",
        ) from None


def _prepare_out(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out}: directory is not empty",
                hint="choose an empty or new --out, or pass --force to regenerate the dataset",
            )
        # only case files we would write ourselves; a workdir with a ledger stays untouched
        for folder in ("images", "labels"):
            for stale in (out / folder).glob("case_*.nii.gz"):
                stale.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)


def _site_style(seed: int, site_shift: float) -> _SiteStyle:
    rng = np.random.default_rng([seed, 104729])
    shift = float(site_shift)
    return _SiteStyle(
        scale=400.0 * math.exp(0.5 * shift) * rng.uniform(0.85, 1.15),
        offset=60.0 * shift + rng.uniform(-20.0, 20.0),
        noise=0.03 * (1.0 + abs(shift)) * rng.uniform(0.8, 1.25),
        contrast=max(0.25, 0.6 - 0.1 * shift) * rng.uniform(0.9, 1.1),
        lesion_scale=max(0.5, 1.0 + 0.35 * shift) * rng.uniform(0.85, 1.15),
        lesion_rate=max(0.2, 1.0 + 0.7 * shift) * rng.uniform(0.7, 1.3),
        bias=0.15 * rng.uniform(0.5, 1.5),
    )


def _make_case(
    rng: np.random.Generator, *, size: int, spatial_dims: int, style: _SiteStyle
) -> tuple[_Array, np.ndarray[Any, np.dtype[np.uint8]], _Array]:
    if spatial_dims == 3:
        wiggle = max(1, size // 8)
        shape = tuple(int(size + rng.integers(-wiggle, wiggle + 1)) for _ in range(3))
    else:
        shape = (size, size)
    # coordinates in [-1, 1] along each axis, as broadcastable open grids (cheap)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    coords = [
        (g.astype(np.float64) + 0.5) / n * 2.0 - 1.0 for g, n in zip(grid, shape, strict=True)
    ]

    body_r = rng.uniform(0.72, 0.9, size=spatial_dims)
    body_c = rng.uniform(-0.05, 0.05, size=spatial_dims)
    body = _soft(_radius2(coords, body_c, body_r), sharpness=12.0)
    texture = np.zeros(shape)
    for _ in range(4):
        freq = rng.uniform(0.5, 2.5, size=spatial_dims)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        wave = sum((f * math.pi * c for f, c in zip(freq, coords, strict=True)), np.zeros(shape))
        texture = texture + np.cos(wave + phase) / 4.0
    organ_r = body_r * rng.uniform(0.35, 0.55, size=spatial_dims)
    organ_c = body_c + rng.uniform(-0.25, 0.25, size=spatial_dims)
    organ = _soft(_radius2(coords, organ_c, organ_r), sharpness=8.0)
    image = body * (0.45 + 0.08 * texture) + 0.15 * organ

    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = 1 + int(rng.poisson(style.lesion_rate))
    voxel = 2.0 / min(shape)  # one voxel in normalised units
    for _ in range(n_lesions):
        radii = style.lesion_scale * rng.uniform(0.2, 0.36, size=spatial_dims)
        radii = np.maximum(radii, 1.6 * voxel)  # never so small that no voxel is labelled
        center = rng.uniform(-0.45, 0.45, size=spatial_dims) * body_r
        r2 = _radius2(coords, center, radii)
        label[r2 <= 1.0] = 1
        image = image + style.contrast * rng.uniform(0.8, 1.2) * _soft(r2, sharpness=6.0)

    direction = rng.normal(size=spatial_dims)
    direction /= np.linalg.norm(direction)
    ramp = sum((d * c for d, c in zip(direction, coords, strict=True)), np.zeros(shape))
    image = image * (1.0 + style.bias * ramp)
    image = image + rng.normal(0.0, style.noise, size=shape)
    image = style.offset + style.scale * image
    return image, label, _affine(rng, spatial_dims)


def _radius2(coords: list[_Array], center: _Array, radii: _Array) -> _Array:
    total: _Array = np.zeros(())
    for c, m, r in zip(coords, center, radii, strict=True):
        total = total + ((c - m) / r) ** 2
    return total


def _soft(r2: _Array, *, sharpness: float) -> _Array:
    """1 inside an ellipsoid, 0 outside, with a smooth edge (no aliasing staircase)."""
    result: _Array = 0.5 * (1.0 + np.tanh(sharpness * (1.0 - np.sqrt(r2))))
    return result


def _affine(rng: np.random.Generator, spatial_dims: int) -> _Array:
    spacing = np.ones(3)
    spacing[:spatial_dims] = rng.uniform(1.0, 1.5, size=spatial_dims)
    signs = np.ones(3)
    if rng.random() < 0.5:
        # scanner exports often store LPS-like axes; Orientationd must undo it
        signs[:2] = -1.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing * signs)
    affine[:3, 3] = rng.uniform(-50.0, 50.0, size=3).round(2)
    return affine


def _save(data: np.ndarray[Any, Any], affine: _Array, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    nib.save(image, path)
