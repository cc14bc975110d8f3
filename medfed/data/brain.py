"""Synthetic brains: the MNI152 template that nilearn ships, deformed and rescanned per patient.

The source is the ICBM152 2009a (symmetric, 1 mm) T1, gray-matter and white-matter templates in
nilearn's package folder, read by ``nilearn.datasets.load_mni152_template``,
``load_mni152_gm_template``, ``load_mni152_wm_template`` and ``load_mni152_brain_mask``:
files installed with nilearn (the optional extra ``medfed[brain]``), never a download.

Each patient is the template's head box (the brain mask's bounding box with a margin, padded to
a cube) seen through a small random affine (rotation, head size, position) and a random
smooth displacement field, sampled on a ``size``\\ ^3 grid. Its image is the deformed T1 with a
contrast curve, a patient's intensity scale, a smooth multiplicative bias field and scanner
noise; the site's scanner (``site_shift``) moves the intensity scale, offset, contrast and noise
level, so that sites differ as scanners do. The label is tissue: 0 background and CSF, 1 gray
matter, 2 white matter, whichever of the deformed tissue probabilities is largest (the
probability of neither being ``1 - gm - wm``). Output is reproducible from the seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.errors import ConfigError

_Array = np.ndarray[Any, np.dtype[np.float64]]
_Labels = np.ndarray[Any, np.dtype[np.uint8]]

BRAIN_CLASSES = (0, 1, 2)  # background and CSF, gray matter, white matter
MIN_BRAIN_SIZE = 16
_MARGIN_MM = 6  # around the brain mask's bounding box
_CONTROL_POINTS = 5  # per axis, of the random displacement field
_DISPLACEMENT = 0.025  # its standard deviation, as a share of the head box
_PRESMOOTH = 0.4  # Gaussian sigma before sampling, in output voxels (against aliasing)


@dataclass(frozen=True)
class BrainStyle:
    """A site's scanner: how the same tissue comes out in its images."""

    scale: float
    offset: float
    gamma: float
    noise: float
    bias: float


@dataclass(frozen=True)
class _Templates:
    """The head box of the three templates, pre-smoothed for one output size."""

    t1: np.ndarray[Any, np.dtype[np.float32]]
    gm: np.ndarray[Any, np.dtype[np.float32]]
    wm: np.ndarray[Any, np.dtype[np.float32]]
    spacing_mm: float  # of the box's voxels


def brain_style(seed: int, site_shift: float) -> BrainStyle:
    """The scanner of a site: ``site_shift`` moves its scale, offset, contrast and noise."""
    rng = np.random.default_rng([seed, 15485863])
    shift = float(site_shift)
    return BrainStyle(
        scale=500.0 * math.exp(0.5 * shift) * rng.uniform(0.9, 1.1),
        offset=80.0 * shift + rng.uniform(-15.0, 15.0),
        gamma=math.exp(0.3 * shift) * rng.uniform(0.95, 1.05),
        noise=0.02 * (1.0 + abs(shift)) * rng.uniform(0.8, 1.25),
        bias=0.12 * (1.0 + abs(shift)) * rng.uniform(0.8, 1.2),
    )


def check_nilearn() -> None:
    """ConfigError unless nilearn (the ``brain`` extra) is installed."""
    try:
        import nilearn.datasets  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the brain task reads the MNI152 templates that nilearn ships, and nilearn is "
            "not installed",
            hint="install the brain extra: pip install 'medfed[brain]'",
        ) from None


def brain_case(
    rng: np.random.Generator, *, size: int, style: BrainStyle
) -> tuple[_Array, _Labels, _Array]:
    """One patient: image, tissue label and affine, all ``size``\\ ^3."""
    from scipy.ndimage import map_coordinates, zoom

    templates = _templates(size)
    box = templates.t1.shape[0]
    step = box / size  # box voxels per output voxel
    centre = (box - 1) / 2.0
    grid = (np.indices((size,) * 3, dtype=np.float64) + 0.5) * step - box / 2.0
    matrix = _random_rotation(rng, degrees=8.0) @ np.diag(rng.uniform(0.9, 1.1, size=3))
    shift = rng.uniform(-0.03, 0.03, size=3) * box
    coords = np.einsum("ij,j...->i...", matrix, grid) + (centre + shift)[:, None, None, None]
    control = rng.normal(0.0, _DISPLACEMENT * box, size=(3, *(_CONTROL_POINTS,) * 3))
    factor = size / _CONTROL_POINTS
    coords += np.stack([zoom(axis, factor, order=3, mode="nearest") for axis in control])

    def sample(volume: np.ndarray[Any, Any]) -> _Array:
        values = map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)
        return np.asarray(values, dtype=np.float64)

    t1, gm, wm = (sample(v) for v in (templates.t1, templates.gm, templates.wm))
    other = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = np.argmax(np.stack([other, gm, wm]), axis=0).astype(np.uint8)

    image = np.clip(t1, 0.0, 1.0) ** style.gamma * rng.uniform(0.9, 1.1)
    image = image * _bias_field(rng, size=size, strength=style.bias)
    image = image + rng.normal(0.0, style.noise, size=image.shape)
    image = style.offset + style.scale * image
    return image, label, _affine(rng, size=size, spacing=templates.spacing_mm * step)


@functools.lru_cache(maxsize=4)
def _templates(size: int) -> _Templates:
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )
    from scipy.ndimage import gaussian_filter

    def array(image: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)

    mask_image = load_mni152_brain_mask()
    spacing = float(abs(mask_image.affine[0, 0]))
    mask = array(mask_image) > 0
    t1, gm, wm = (
        array(f()) for f in (load_mni152_template, load_mni152_gm_template, load_mni152_wm_template)
    )
    margin = math.ceil(_MARGIN_MM / spacing)
    lows, highs = [], []
    for axis in range(3):
        present = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        lows.append(max(0, int(present[0]) - margin))
        highs.append(min(mask.shape[axis], int(present[-1]) + 1 + margin))
    side = max(high - low for low, high in zip(lows, highs, strict=True))
    sigma = _PRESMOOTH * side / size

    def cube(volume: np.ndarray[Any, np.dtype[np.float32]]) -> Any:
        out = np.zeros((side,) * 3, dtype=np.float32)
        part = volume[tuple(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True))]
        start = [(side - n) // 2 for n in part.shape]
        out[tuple(slice(s, s + n) for s, n in zip(start, part.shape, strict=True))] = part
        return gaussian_filter(out, sigma=sigma) if sigma > 0.5 else out

    return _Templates(t1=cube(t1), gm=cube(gm), wm=cube(wm), spacing_mm=spacing)


def _random_rotation(rng: np.random.Generator, *, degrees: float) -> _Array:
    matrix = np.eye(3)
    for axis, angle in enumerate(np.radians(rng.uniform(-degrees, degrees, size=3))):
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = math.cos(angle)
        turn[i, j], turn[j, i] = -math.sin(angle), math.sin(angle)
        matrix = matrix @ turn
    return matrix


def _bias_field(rng: np.random.Generator, *, size: int, strength: float) -> _Array:
    """A smooth positive field: exp of a random linear plus quadratic function of position."""
    axes = np.ogrid[(slice(0, size),) * 3]
    coords = [(a.astype(np.float64) + 0.5) / size * 2.0 - 1.0 for a in axes]
    linear = rng.normal(size=3)
    quadratic = rng.normal(size=3) * 0.5
    field: _Array = np.zeros((size,) * 3)
    for c, a, b in zip(coords, linear, quadratic, strict=True):
        field = field + a * c + b * (c * c - 1.0 / 3.0)
    return np.exp(strength * field)


def _affine(rng: np.random.Generator, *, size: int, spacing: float) -> _Array:
    signs = np.ones(3)
    if rng.random() < 0.5:
        # scanner exports often store LPS-like axes; Orientationd must undo it
        signs[:2] = -1.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing * signs)
    affine[:3, 3] = -signs * spacing * size / 2.0 + rng.uniform(-5.0, 5.0, size=3).round(2)
    return affine
