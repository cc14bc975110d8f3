"""Checking a site's dataset before anything trains on it.

Every case is read with nibabel (header and voxel data) one at a time, and every problem is
recorded instead of stopping at the first: a hospital fixing its export wants the whole list.
A header is judged before its voxels are read, so a damaged one that declares an absurd volume
costs nothing. :mod:`medfed.data.screen` runs the same checks before a site trains.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import nibabel as nib
import numpy as np

from medfed.data.manifest import Case, load_manifest

if TYPE_CHECKING:
    from medfed.config.site import DataSection

Severity = Literal["error", "warning"]

AFFINE_TOLERANCE = 1e-3
# Rotation of a voxel axis from the scanner's axes (radians) above which a scan is oblique.
OBLIQUITY_TOLERANCE = 1e-3
DEFAULT_MAX_VOXELS = 1 << 30
_MAX_VALUES_SHOWN = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one case. Warnings (e.g. an allowed empty label) do not make it bad."""

    patient_id: str
    path: Path | None
    message: str
    severity: Severity = "error"

    def line(self) -> str:
        """``PATIENT FILE: message``, the form the CLI prints."""
        where = f" {self.path}" if self.path is not None else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{self.patient_id}{where}: {prefix}{self.message}"


@dataclass(frozen=True)
class DataReport:
    """The outcome of :func:`check_dataset`."""

    n_cases: int
    n_bad: int
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when no case has an error (warnings allowed)."""
        return self.n_bad == 0

    @property
    def n_warnings(self) -> int:
        return sum(1 for problem in self.problems if problem.severity == "warning")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "ok": self.ok,
            "n_cases": self.n_cases,
            "n_bad": self.n_bad,
            "n_warnings": self.n_warnings,
            "problems": [
                {
                    "patient_id": p.patient_id,
                    "path": str(p.path) if p.path is not None else None,
                    "message": p.message,
                    "severity": p.severity,
                }
                for p in self.problems
            ],
        }


_Array = np.ndarray[Any, Any]


class _Report(Protocol):
    def __call__(self, path: Path | None, message: str, severity: Severity = "error") -> None: ...


class _ContentCheck(Protocol):
    def __call__(self, data: _Array, path: Path, report: _Report) -> None: ...


@dataclass(frozen=True)
class CheckSettings:
    """What a case is checked against; :meth:`of` takes it from a site's ``data`` section."""

    classes: tuple[int, ...]
    spatial_dims: int
    allow_empty_labels: bool = False
    strict_geometry: bool = False
    max_voxels: int = DEFAULT_MAX_VOXELS

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")

    @classmethod
    def of(cls, data: DataSection) -> CheckSettings:
        return cls(
            classes=tuple(data.classes),
            spatial_dims=len(data.patch_size),
            allow_empty_labels=data.allow_empty_labels,
            strict_geometry=data.strict_geometry,
            max_voxels=data.max_voxels,
        )


class CaseCheck(Protocol):
    """How :func:`check_dataset` checks one case (:func:`check_case`, or a cache in front)."""

    def __call__(self, case: Case, settings: CheckSettings) -> list[Problem]: ...


@dataclass(frozen=True)
class _Volume:
    spatial_shape: tuple[int, ...]
    affine: np.ndarray[Any, np.dtype[np.float64]]


def check_dataset(
    *,
    cases: Sequence[Case] | None = None,
    manifest: Path | str | None = None,
    classes: Sequence[int] = (),
    spatial_dims: int = 3,
    allow_empty_labels: bool = False,
    strict_geometry: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    settings: CheckSettings | None = None,
    check: CaseCheck | None = None,
) -> DataReport:
    """Check every case of a dataset (given as ``cases`` or as a ``manifest`` path).

    Finds missing, unreadable and non-NIfTI files, headers declaring more than ``max_voxels``
    voxels (before reading them) or zero, negative or non-finite voxel sizes, image/label shape
    and affine mismatches, wrong dimensionality, label values outside ``classes`` or not
    integer-valued, NaN/Inf image voxels, constant (e.g. all-zero) images, empty labels (an
    error, or a warning with ``allow_empty_labels``), oblique or non-invertible affines (a
    warning, or an error with ``strict_geometry``) and duplicate patient ids. ``settings``
    (e.g. ``CheckSettings.of(config.data)``) replaces the keyword settings; ``check`` replaces
    the per-case check (:mod:`medfed.data.screen` puts a cache in front of it). Never raises
    for a bad case; an unreadable manifest raises :class:`~medfed.errors.DataError` from
    :func:`load_manifest`.
    """
    if (cases is None) == (manifest is None):
        raise TypeError("give exactly one of cases= or manifest=")
    if settings is None:
        if not classes:
            raise TypeError("give classes= or settings=")
        settings = CheckSettings(
            classes=tuple(classes),
            spatial_dims=spatial_dims,
            allow_empty_labels=allow_empty_labels,
            strict_geometry=strict_geometry,
            max_voxels=max_voxels,
        )
    check = check or check_case
    case_list = list(cases) if cases is not None else load_manifest(Path(manifest or ""))
    per_case: list[list[Problem]] = [[] for _ in case_list]

    # one patient must be exactly one example: a repeated id or a scan listed under two ids
    # would let one person contribute twice per DP-SGD step
    by_id: dict[str, Case] = {}
    by_image: dict[Path, Case] = {}
    for index, case in enumerate(case_list):
        earlier = by_id.setdefault(case.patient_id, case)
        if earlier is not case:
            per_case[index].append(
                Problem(
                    case.patient_id,
                    case.image,
                    f"duplicate patient id (first listed with {earlier.image}); one patient "
                    "must be one row",
                )
            )
            continue
        other = by_image.setdefault(case.image, case)
        if other is not case:
            per_case[index].append(
                Problem(
                    case.patient_id,
                    case.image,
                    f"same image file as patient {other.patient_id}; one scan cannot belong "
                    "to two patients",
                )
            )
    for index, case in enumerate(case_list):
        per_case[index] += check(case, settings)

    problems = tuple(problem for found in per_case for problem in found)
    n_bad = sum(1 for found in per_case if any(p.severity == "error" for p in found))
    return DataReport(n_cases=len(case_list), n_bad=n_bad, problems=problems)


def check_case(case: Case, settings: CheckSettings) -> list[Problem]:
    """Every problem of one case's image and label files (cross-case checks excluded)."""
    problems: list[Problem] = []
    classes = list(settings.classes)
    empty_label: Severity = "warning" if settings.allow_empty_labels else "error"

    def report(path: Path | None, message: str, severity: Severity = "error") -> None:
        problems.append(Problem(case.patient_id, path, message, severity))

    def label_content(data: _Array, path: Path, report: _Report) -> None:
        _label_content(data, path, report, classes=classes, empty_label=empty_label)

    image = _read(case.image, settings, report, _image_content)
    label = _read(case.label, settings, report, label_content)
    if image is not None and label is not None:
        if image.spatial_shape != label.spatial_shape:
            report(
                case.label,
                f"label shape {_fmt(label)} does not match image shape {_fmt(image)}",
            )
        elif image.affine.shape != label.affine.shape:
            report(case.label, "label affine has a different size from the image affine")
        else:
            diff = float(np.max(np.abs(image.affine - label.affine)))
            if diff > AFFINE_TOLERANCE:
                report(
                    case.label,
                    f"label affine differs from image affine (largest difference {diff:.4g}); "
                    "image and label must lie on the same voxel grid",
                )
    return problems


def _fmt(volume: _Volume) -> str:
    return "x".join(str(s) for s in volume.spatial_shape)


def _read(
    path: Path, settings: CheckSettings, report: _Report, content_check: _ContentCheck
) -> _Volume | None:
    """Load one file; on any problem report it and return None (or the volume if usable)."""
    spatial_dims = settings.spatial_dims
    if not path.exists():
        report(path, "file not found")
        return None
    if not path.is_file():
        report(path, "not a regular file")
        return None
    try:
        # nibabel repairs some header defects on load and says so on the console: the
        # repaired fields are judged below from the raw header instead
        with _quiet_nibabel():
            img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt input; all mean the same
        report(path, f"cannot be read as NIfTI ({_describe(exc)})")
        return None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        report(path, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
        return None
    shape = tuple(int(s) for s in img.shape)
    if not _header_fits(img, shape, path, settings.max_voxels, report):
        return None
    spatial = _spatial_shape(shape, spatial_dims)
    if spatial is None:
        report(
            path,
            f"shape {shape} is not {spatial_dims}-D (patch_size has {spatial_dims} entries; "
            "a trailing singleton channel is allowed)",
        )
    _check_geometry(img, spatial_dims, path, settings.strict_geometry, report)
    _check_voxel_sizes(img, spatial_dims, path, report)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        report(path, f"voxel data cannot be read ({_describe(exc)})")
        return None
    content_check(data, path, report)
    del data
    if spatial is None:
        return None
    return _Volume(spatial_shape=spatial, affine=np.asarray(img.affine, dtype=np.float64))


def _header_fits(
    img: nib.Nifti1Image | nib.Nifti2Image,
    shape: tuple[int, ...],
    path: Path,
    max_voxels: int,
    report: _Report,
) -> bool:
    """False (reported) for a header whose volume is absurd or cannot be in the file."""
    voxels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    shown = "x".join(str(s) for s in shape)
    if voxels == 0:
        report(path, f"the header declares an empty volume ({shown or 'no dimensions'})")
        return False
    if voxels > max_voxels:
        report(
            path,
            f"the header declares {shown} = {voxels:.3g} voxels, more than data.max_voxels "
            f"{max_voxels:.3g}: the header is damaged, or raise data.max_voxels for this site",
        )
        return False
    if not str(path).endswith(".gz"):
        # uncompressed: the file must hold the header's offset plus every voxel
        header: Any = img.header
        needed = int(header.get_data_offset()) + voxels * header.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            report(path, f"truncated: the header needs {needed} bytes, the file has {size}")
            return False
    return True


def _check_geometry(
    img: nib.Nifti1Image | nib.Nifti2Image,
    spatial_dims: int,
    path: Path,
    strict: bool,
    report: _Report,
) -> None:
    severity: Severity = "error" if strict else "warning"
    affine = np.asarray(img.affine, dtype=np.float64)
    rotation = affine[:3, :3]
    if not np.all(np.isfinite(rotation)) or abs(float(np.linalg.det(rotation))) < 1e-12:
        report(
            path,
            "the affine is not invertible (voxels have no position in space); rewrite the "
            "file's sform/qform",
            severity,
        )
        return
    affines: Any = nib.affines
    angle = float(np.max(affines.obliquity(affine)))
    if angle > OBLIQUITY_TOLERANCE:
        report(
            path,
            f"oblique affine (voxel axes {np.degrees(angle):.2g} degrees from the scanner's); "
            "resample it to an axis-aligned grid if other scans are not",
            severity,
        )


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_voxel_sizes(
    img: nib.Nifti1Image | nib.Nifti2Image, spatial_dims: int, path: Path, report: _Report
) -> None:
    """The header's voxel sizes as written: nibabel's loader replaces zero or negative ones."""
    header_type: Any = type(img.header)
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as stream:
            header = header_type.from_fileobj(stream, check=False)
        zooms = [float(z) for z in header["pixdim"][1 : 1 + spatial_dims]]
    except (OSError, EOFError, ValueError):
        return  # unreadable beyond what nib.load took: the voxel data check reports it
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        shown = ", ".join(f"{z:g}" for z in zooms)
        report(path, f"voxel sizes ({shown}) must be positive: the header's pixdim is damaged")


def _spatial_shape(shape: tuple[int, ...], spatial_dims: int) -> tuple[int, ...] | None:
    if len(shape) < spatial_dims or len(shape) > 4:
        return None
    if any(extent != 1 for extent in shape[spatial_dims:]):
        return None
    return shape[:spatial_dims]


def _image_content(data: _Array, path: Path, report: _Report) -> None:
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        report(path, f"image voxels are {data.dtype}, not real numbers")
        return
    if np.issubdtype(data.dtype, np.floating):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            report(path, f"image has {bad} NaN/Inf voxel{'s' if bad != 1 else ''}")
            return
    if data.size and data.min() == data.max():
        value = data.flat[0]
        what = "all zeros" if value == 0 else f"constant (every voxel is {value:g})"
        report(path, f"image is {what}: nothing to learn from")


def _label_content(
    data: _Array, path: Path, report: _Report, *, classes: list[int], empty_label: Severity
) -> None:
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        report(path, f"label voxels are {data.dtype}, not numbers")
        return
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            report(path, "label has NaN/Inf voxels")
            data = data[finite]
        fractional = data != np.round(data)
        if fractional.any():
            shown = _show(np.unique(data[fractional]))
            report(path, f"label is not integer-valued (values such as {shown})")
            data = data[~fractional]
    values = np.unique(data)
    unknown = values[~np.isin(values, classes)]
    if unknown.size:
        report(path, f"label values {_show(unknown)} are not in classes {classes}")
    if values.size and not np.any(values != classes[0]):
        report(path, f"label has no foreground (only background {classes[0]})", empty_label)


def _show(values: _Array) -> str:
    shown = [
        f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_MAX_VALUES_SHOWN].tolist()
    ]
    more = f", ... ({values.size} in all)" if values.size > _MAX_VALUES_SHOWN else ""
    return "[" + ", ".join(shown) + more + "]"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
