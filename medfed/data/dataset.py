"""Datasets over a site's patients: one item per patient, the DP-SGD privacy unit.

The deterministic preprocessing of each case runs once and is kept in memory (and, when a
``cache_dir`` is given, on disk as ``.npz`` files keyed by the files' identity and the pipeline
settings, so that a fresh process per federated round starts fast). Only the random crop and
augmentation run per draw.

Item format (both datasets): ``{"image": float32 [1, *spatial], "label": int64 [1, *spatial]
class indices 0..K-1, "patient": int}``, where ``patient`` is the case's index in the dataset
so that a training loop can check that no patient appears twice in a batch. Training items are
exactly ``patch_size``; validation items are whole volumes, padded to at least ``patch_size``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from medfed.config.site import DataSection, SiteConfig
from medfed.data.manifest import Case, load_manifest, split_cases
from medfed.data.screen import problems_file, screen_cases
from medfed.data.transforms import (
    augment_transforms,
    declared_samples,
    pipeline_signature,
    preprocess_transforms,
)
from medfed.errors import DataError, MedfedError, PrivacyUnitError

RandomTransform = Callable[[dict[str, Any]], Any]


class PatientItem(TypedDict):
    """One patient's example."""

    image: torch.Tensor
    label: torch.Tensor
    patient: int


class _Preprocessed:
    """Deterministic preprocessing per case, computed once; memory and optional disk cache."""

    def __init__(
        self, cases: Sequence[Case], data: DataSection, *, cache_dir: Path | None, memory: bool
    ) -> None:
        self.cases = list(cases)
        self.transform = preprocess_transforms(data)
        self.signature = pipeline_signature(data)
        self.cache_dir = cache_dir
        self.memory = memory
        self._items: dict[int, dict[str, torch.Tensor]] = {}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cached = self._items.get(index)
        if cached is not None:
            return cached
        case = self.cases[index]
        item = self._read_disk(case)
        if item is None:
            item = self._compute(case)
            self._write_disk(case, item)
        if self.memory:
            self._items[index] = item
        return item

    def _compute(self, case: Case) -> dict[str, torch.Tensor]:
        try:
            out = self.transform({"image": str(case.image), "label": str(case.label)})
        except Exception as exc:  # MONAI wraps every failure in RuntimeError; find the cause
            cause = _root_cause(exc)
            where = f"patient {case.patient_id} ({case.image})"
            if isinstance(cause, MedfedError):
                raise type(cause)(f"{where}: {cause.message}", hint=cause.hint) from None
            raise DataError(
                f"{where}: cannot be preprocessed ({_describe(cause)})",
                hint="run `medfed data check --config SITE.yaml` for a list of data problems",
            ) from None
        return {"image": out["image"].contiguous(), "label": out["label"].contiguous()}

    def _key_path(self, case: Case) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            stats = [
                (str(p.absolute()), p.stat().st_size, p.stat().st_mtime_ns)
                for p in (case.image, case.label)
            ]
        except OSError:
            return None  # let _compute report the missing file
        digest = hashlib.sha256(repr((self.signature, stats)).encode()).hexdigest()
        return self.cache_dir / f"{digest}.npz"

    def _read_disk(self, case: Case) -> dict[str, torch.Tensor] | None:
        path = self._key_path(case)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {
                    "image": torch.from_numpy(stored["image"]),
                    "label": torch.from_numpy(stored["label"]),
                }
        except (OSError, ValueError, KeyError):
            return None  # a damaged cache entry is recomputed and overwritten

    def _write_disk(self, case: Case, item: dict[str, torch.Tensor]) -> None:
        path = self._key_path(case)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename, so a crash or a concurrent reader never sees half a file
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, image=item["image"].numpy(), label=item["label"].numpy())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class PatientDataset(Dataset[PatientItem]):
    """Training dataset: one random ``patch_size`` crop of one patient per item.

    Raises :class:`PrivacyUnitError` when a patient id occurs twice, or when the random pipeline
    declares or yields more than one sample per patient. Seed it with ``seed`` (or
    :meth:`set_random_state`) for reproducible crops; with DataLoader workers use MONAI's
    DataLoader (it re-seeds workers) or ``num_workers=0``.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        *,
        data: DataSection,
        seed: int = 0,
        cache_dir: Path | None = None,
        memory_cache: bool = True,
        random_transform: RandomTransform | None = None,
    ) -> None:
        _require_unique_patients(cases)
        transform = random_transform if random_transform is not None else augment_transforms(data)
        samples = declared_samples(transform)
        if samples != 1:
            raise PrivacyUnitError(
                f"the random transform takes {samples} samples per patient; DP-SGD clips per "
                "example, so each extra sample multiplies the privacy cost",
                hint="use num_samples=1 (one crop per patient per step)",
            )
        self.cases = tuple(cases)
        self.data = data
        self.random_transform = transform
        self._pre = _Preprocessed(cases, data, cache_dir=cache_dir, memory=memory_cache)
        self.set_random_state(seed)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> PatientItem:
        index = int(index)  # samplers may hand out numpy or torch integers
        pre = self._pre[index]
        with warnings.catch_warnings():
            # negative cases (no foreground) are legitimate; the crop falls back to background
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            out = self.random_transform({"image": pre["image"], "label": pre["label"]})
        if isinstance(out, list | tuple):
            if len(out) != 1:
                raise PrivacyUnitError(
                    f"patient {self.cases[index].patient_id}: the random transform yielded "
                    f"{len(out)} samples; one patient must give exactly one example per step",
                    hint="use one crop per patient (num_samples=1)",
                )
            out = out[0]
        return _item(out, index)

    def set_random_state(self, seed: int) -> None:
        """Re-seed every random transform (e.g. with ``seed + round`` for each round)."""
        setter = getattr(self.random_transform, "set_random_state", None)
        if setter is not None:
            setter(seed=seed)

    def preload(self) -> None:
        """Preprocess every case now (before forking DataLoader workers, or to fail early)."""
        for index in range(len(self)):
            self._pre[index]


class ValidationDataset(Dataset[PatientItem]):
    """Whole preprocessed volumes (padded to at least ``patch_size``), one item per patient."""

    def __init__(
        self,
        cases: Sequence[Case],
        *,
        data: DataSection,
        cache_dir: Path | None = None,
        memory_cache: bool = True,
    ) -> None:
        self.cases = tuple(cases)
        self.data = data
        self._pre = _Preprocessed(cases, data, cache_dir=cache_dir, memory=memory_cache)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> PatientItem:
        index = int(index)
        return _item(self._pre[index], index)

    def preload(self) -> None:
        """Preprocess every case now."""
        for index in range(len(self)):
            self._pre[index]


@dataclass(frozen=True)
class SiteDatasets:
    """A site's training and validation data, and the cases behind them."""

    train: PatientDataset
    val: ValidationDataset
    train_cases: tuple[Case, ...]
    val_cases: tuple[Case, ...]


def build_datasets(config: SiteConfig, *, disk_cache: bool = True) -> SiteDatasets:
    """Load the manifest, screen its cases, split them and build both datasets.

    A case that fails its check raises :class:`DataError` (or is left out, as the site's
    ``data.bad_cases`` says; :mod:`medfed.data.screen`).

    ``config`` paths must be absolute (as :func:`medfed.config.load_site_config` returns them).
    The random crops are seeded with ``config.training.seed``; the preprocessed volumes and
    the screen's record are kept under ``config.cache_dir`` and the workdir when ``disk_cache``
    is true; without it nothing is written at the site.
    """
    cases = load_manifest(config.data.manifest)
    _require_unique_patients(cases)
    # every case is checked before any is used: a bad one stops here, before the ledger
    screened = screen_cases(
        cases,
        data=config.data,
        cache_dir=config.cache_dir if disk_cache else None,
        problems_path=problems_file(config.paths.workdir) if disk_cache else None,
    )
    cases = list(screened.cases)
    train_cases, val_cases = split_cases(
        cases, val_fraction=config.data.val_fraction, seed=config.training.seed
    )
    cache_dir = config.cache_dir / "preprocessed" if disk_cache else None
    return SiteDatasets(
        train=PatientDataset(
            train_cases, data=config.data, seed=config.training.seed, cache_dir=cache_dir
        ),
        val=ValidationDataset(val_cases, data=config.data, cache_dir=cache_dir),
        train_cases=tuple(train_cases),
        val_cases=tuple(val_cases),
    )


def _item(sample: Any, index: int) -> PatientItem:
    if not isinstance(sample, dict) or "image" not in sample or "label" not in sample:
        raise DataError(
            f"case {index}: the transform pipeline must return a dict with image and label",
        )
    image = torch.as_tensor(sample["image"]).as_subclass(torch.Tensor)
    label = torch.as_tensor(sample["label"]).as_subclass(torch.Tensor)
    # copy: a crop can be a view into the cached volume, which must never be changed in place
    return {
        "image": image.to(torch.float32, copy=True),
        "label": label.to(torch.int64, copy=True),
        "patient": index,
    }


def _require_unique_patients(cases: Sequence[Case]) -> None:
    """One patient, one example: no repeated id, and no scan listed under two ids."""
    for what, keys in (
        ("patient ids", [c.patient_id for c in cases]),
        ("image files", [str(c.image) for c in cases]),
    ):
        repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
        if repeated:
            shown = ", ".join(repeated[:10]) + (" ..." if len(repeated) > 10 else "")
            raise PrivacyUnitError(
                f"{what} listed more than once: {shown}; each patient must be one example",
                hint="keep one row (one scan) per patient in the manifest",
            )


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0][:200] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc
