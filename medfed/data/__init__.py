"""Site data: manifests, dataset checks, synthetic sites, MONAI transforms and datasets.

Names are loaded on first use so that ``import medfed.data`` (and the CLI) does not pay for
importing MONAI and torch until a transform or dataset is actually needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medfed.data.dataset import (
        PatientDataset,
        PatientItem,
        SiteDatasets,
        ValidationDataset,
        build_datasets,
    )
    from medfed.data.manifest import Case, load_manifest, split_cases
    from medfed.data.synth import SynthResult, synthesize_site
    from medfed.data.transforms import (
        TrainTransforms,
        augment_transforms,
        preprocess_transforms,
        train_transforms,
        val_transforms,
    )
    from medfed.data.validate import DataReport, Problem, check_dataset

_EXPORTS = {
    "Case": "manifest",
    "load_manifest": "manifest",
    "split_cases": "manifest",
    "DataReport": "validate",
    "Problem": "validate",
    "check_dataset": "validate",
    "SynthResult": "synth",
    "synthesize_site": "synth",
    "TrainTransforms": "transforms",
    "augment_transforms": "transforms",
    "preprocess_transforms": "transforms",
    "train_transforms": "transforms",
    "val_transforms": "transforms",
    "PatientDataset": "dataset",
    "PatientItem": "dataset",
    "SiteDatasets": "dataset",
    "ValidationDataset": "dataset",
    "build_datasets": "dataset",
}

__all__ = [
    "Case",
    "DataReport",
    "PatientDataset",
    "PatientItem",
    "Problem",
    "SiteDatasets",
    "SynthResult",
    "TrainTransforms",
    "ValidationDataset",
    "augment_transforms",
    "build_datasets",
    "check_dataset",
    "load_manifest",
    "preprocess_transforms",
    "split_cases",
    "synthesize_site",
    "train_transforms",
    "val_transforms",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medfed.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medfed.data.{module}"), name)
    globals()[name] = value
    return value
