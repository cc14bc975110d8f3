"""Checking a site's dataset before anything trains on it.

Every case is read with nibabel (header and voxel data) one at a time, and every problem is
recorded instead of stopping at the first: a hospital fixing its export wants the whole list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import nibabel as nib
import numpy as np

from medfed.data.manifest import Case, load_manifest

Severity = Literal["error", "warning"]

AFFINE_TOLERANCE = 1e-3
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
class _Volume:
    spatial_shape: tuple[int, ...]
    affine: np.ndarray[Any, np.dtype[np.float64]]


def check_dataset(
    *,
    cases: Sequence[Case] | None = None,
    manifest: Path | str | None = None,
    classes: Sequence[int],
    spatial_dims: int,
    allow_empty_labels: bool = False,
) -> DataReport:
    """Check every case of a dataset (given as ``cases`` or as a ``manifest`` path).

    Finds missing, unreadable and non-NIfTI files, image/label shape and affine mismatches,
    wrong dimensionality, label values outside ``classes`` or not integer-valued, NaN/Inf image
    voxels, empty labels (an error, or a warning with ``allow_empty_labels``) and duplicate
    patient ids. Never raises for a bad case; an unreadable manifest raises
    :class:`~medfed.errors.DataError` from :func:`load_manifest`.
    """
    if (cases is None) == (manifest is None):
        raise TypeError("give exactly one of cases= or manifest=")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
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
        per_case[index] += _check_case(
            case,
            classes=list(classes),
            spatial_dims=spatial_dims,
            empty_label="warning" if allow_empty_labels else "error",
        )

    problems = tuple(problem for found in per_case for problem in found)
    n_bad = sum(1 for found in per_case if any(p.severity == "error" for p in found))
    return DataReport(n_cases=len(case_list), n_bad=n_bad, problems=problems)


def _check_case(
    case: Case, *, classes: list[int], spatial_dims: int, empty_label: Severity
) -> list[Problem]:
    problems: list[Problem] = []

    def report(path: Path | None, message: str, severity: Severity = "error") -> None:
        problems.append(Problem(case.patient_id, path, message, severity))

    def label_content(data: _Array, path: Path, report: _Report) -> None:
        _label_content(data, path, report, classes=classes, empty_label=empty_label)

    image = _read(case.image, spatial_dims, report, _image_content)
    label = _read(case.label, spatial_dims, report, label_content)
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
    path: Path, spatial_dims: int, report: _Report, content_check: _ContentCheck
) -> _Volume | None:
    """Load one file; on any problem report it and return None (or the volume if usable)."""
    if not path.exists():
        report(path, "file not found")
        return None
    if not path.is_file():
        report(path, "not a regular file")
        return None
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for corrupt input; all mean the same
        report(path, f"cannot be read as NIfTI ({_describe(exc)})")
        return None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        report(path, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
        return None
    shape = tuple(int(s) for s in img.shape)
    spatial = _spatial_shape(shape, spatial_dims)
    if spatial is None:
        report(
            path,
            f"shape {shape} is not {spatial_dims}-D (patch_size has {spatial_dims} entries; "
            "a trailing singleton channel is allowed)",
        )
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
