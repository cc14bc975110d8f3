"""The brain task: gray and white matter of nilearn's bundled MNI152 template, per patient."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medfed.config.loading import load_site_config
from medfed.data import brain
from medfed.data.manifest import load_manifest
from medfed.data.synth import synthesize_site
from medfed.errors import DataError

RunMedfed = Callable[..., CompletedProcess[str]]


def _arrays(folder: Path) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    return [
        (
            np.asanyarray(nib.load(case.image).dataobj),
            np.asanyarray(nib.load(case.label).dataobj),
        )
        for case in load_manifest(folder / "manifest.csv")
    ]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection can be opened, and the templates are read anew from disk."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the brain task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import nilearn.datasets.struct as struct

    brain._templates.cache_clear()
    struct.load_mni152_template.cache_clear()


def test_a_small_brain_site_is_written_checked_and_labelled(
    tmp_path: Path, run_medfed: RunMedfed, offline: None
) -> None:
    result = synthesize_site(
        out=tmp_path / "brain", cases=4, size=32, seed=3, site_shift=-0.5, task="brain"
    )
    config = load_site_config(result.config)
    assert config.data.classes == [0, 1, 2] and config.data.spacing is None
    assert config.data.patch_size == [32, 32, 32]

    check = run_medfed("data", "check", "--config", str(result.config), cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "checked 4 cases: no errors" in check.stdout

    pairs = _arrays(result.out)
    for image, label in pairs:
        assert image.shape == label.shape == (32, 32, 32)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        counts = np.bincount(label.ravel(), minlength=3)
        # gray and white matter both present, and the head fills a good part of the grid
        assert counts[1] > 1000 and counts[2] > 500 and counts[0] > 10000
        # white matter is brighter than gray matter on T1, as in the template
        assert image[label == 2].mean() > image[label == 1].mean()
    labels = [label for _, label in pairs]
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            # each patient is its own deformation of the template
            assert np.mean(labels[i] != labels[j]) > 0.05


def test_sites_with_different_shifts_differ_in_intensity(tmp_path: Path) -> None:
    low = synthesize_site(
        out=tmp_path / "low", cases=3, size=16, seed=4, site_shift=-0.5, task="brain"
    )
    high = synthesize_site(
        out=tmp_path / "high", cases=3, size=16, seed=4, site_shift=0.5, task="brain"
    )
    means = {}
    for name, result in (("low", low), ("high", high)):
        means[name] = np.mean([image[label > 0].mean() for image, label in _arrays(result.out)])
    assert means["high"] > 1.5 * means["low"] > 0
    # the same seed makes the same patients: only the scanner differs
    for (_, a), (_, b) in zip(_arrays(low.out), _arrays(high.out), strict=True):
        assert np.array_equal(a, b)


def test_same_arguments_give_the_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synthesize_site(out=tmp_path / name / "s", cases=3, size=16, seed=9, task="brain")
    files = {
        name: {
            str(p.relative_to(tmp_path / name)): p.read_bytes()
            for p in sorted((tmp_path / name).rglob("*.nii.gz"))
        }
        for name in ("a", "b")
    }
    assert files["a"] == files["b"] and len(files["a"]) == 6


@pytest.mark.parametrize(("dims", "size"), [(2, 32), (3, 12)])
def test_the_brain_task_is_three_dimensional_and_not_tiny(
    tmp_path: Path, dims: int, size: int
) -> None:
    with pytest.raises(DataError, match="brain task makes 3-D volumes"):
        synthesize_site(
            out=tmp_path / "s", cases=3, size=size, seed=0, spatial_dims=dims, task="brain"
        )
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_the_cli_writes_the_shapes_task_by_default_and_the_brain_task_on_request(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    small = ("--cases", "3", "--size", "16")
    made = run_medfed("data", "synth", "--out", "b", *small, "--task", "brain", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert load_site_config(tmp_path / "b" / "site.yaml").data.classes == [0, 1, 2]
    default = run_medfed("data", "synth", "--out", "s", *small, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert load_site_config(tmp_path / "s" / "site.yaml").data.classes == [0, 1]
    wrong = run_medfed("data", "synth", "--out", "x", "--task", "knee", cwd=tmp_path)
    assert wrong.returncode == 2 and "knee" in wrong.stderr
