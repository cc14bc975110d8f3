"""The synthetic site generator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medfed.config.loading import load_site_config
from medfed.data.manifest import load_manifest
from medfed.data.synth import synthesize_site
from medfed.errors import ConfigError, DataError


def _arrays(folder: Path) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    pairs = []
    for case in load_manifest(folder / "manifest.csv"):
        pairs.append(
            (
                np.asanyarray(nib.load(case.image).dataobj),
                np.asanyarray(nib.load(case.label).dataobj),
            )
        )
    return pairs


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_arguments_give_the_same_bytes(tmp_path: Path) -> None:
    start = time.perf_counter()
    first = synthesize_site(out=tmp_path / "a" / "site", cases=24, size=32, seed=5, site_shift=0.5)
    elapsed = time.perf_counter() - start
    synthesize_site(out=tmp_path / "b" / "site", cases=24, size=32, seed=5, site_shift=0.5)
    assert _files(tmp_path / "a" / "site") == _files(tmp_path / "b" / "site")
    assert len(first.patient_ids) == 24 and first.patient_ids[0] == "site-p000"
    assert elapsed < 5.0


def test_layout_dtypes_and_split(tmp_path: Path) -> None:
    result = synthesize_site(out=tmp_path / "s", cases=10, size=16, seed=1, site_id="hosp-a")
    cases = load_manifest(result.manifest)
    assert [c.patient_id for c in cases] == [f"hosp-a-p{i:03d}" for i in range(10)]
    splits = [c.split for c in cases]
    assert splits.count("val") == result.n_val == 2 and splits.count("train") == 8
    shapes = set()
    for case in cases:
        image, label = nib.load(case.image), nib.load(case.label)
        assert case.image.parent.name == "images" and case.label.parent.name == "labels"
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert np.array_equal(image.affine, label.affine) and image.shape == label.shape
        assert all(13 <= s <= 19 for s in image.shape)
        spacing = np.abs(np.diag(image.affine)[:3])
        assert np.all((spacing >= 1.0) & (spacing <= 1.5))
        values = np.unique(np.asanyarray(label.dataobj))
        assert values.tolist() == [0, 1]
        shapes.add(image.shape)
    assert len(shapes) > 1  # shapes vary per case


def test_site_yaml_is_ready_and_relative(tmp_path: Path) -> None:
    result = synthesize_site(out=tmp_path / "s", cases=4, size=40, seed=2, spatial_dims=3)
    text = result.config.read_text()
    assert "manifest: manifest.csv" in text and "workdir: .medfed" in text
    moved = tmp_path / "moved"
    result.out.rename(moved)
    config = load_site_config(moved / "site.yaml")
    assert config.data.manifest == moved.resolve() / "manifest.csv"
    assert config.data.patch_size == [32, 32, 32] and config.spatial_dims == 3
    assert config.privacy.epsilon_cap == 8.0
    assert config.privacy.delta == 1e-5 and config.training.seed == 2
    assert result.n_train >= 2 and result.n_val >= 1
    # One default local run may spend 90% of the cap (the site computes its noise from the
    # count it releases); synthetic counts and Dice are public, with the reason.
    assert config.privacy.target_epsilon_per_round == 0.9 * config.privacy.epsilon_cap
    assert config.policy.max_epsilon_per_round == config.privacy.epsilon_cap
    assert config.release.patient_counts == "public" == config.release.validation_dice
    assert "synthetic" in (config.release.public_reason or "")


def test_two_d_slices(tmp_path: Path) -> None:
    result = synthesize_site(out=tmp_path / "s", cases=5, size=24, seed=3, spatial_dims=2)
    pairs = _arrays(result.out)
    assert all(image.shape == (24, 24) and label.shape == (24, 24) for image, label in pairs)
    assert all(label.any() for _, label in pairs)
    assert load_site_config(result.config).data.patch_size == [24, 24]


def test_seed_and_site_shift_change_the_data(tmp_path: Path) -> None:
    base = _arrays(synthesize_site(out=tmp_path / "a", cases=6, size=16, seed=1).out)
    reseeded = _arrays(synthesize_site(out=tmp_path / "b", cases=6, size=16, seed=2).out)
    shifted = _arrays(
        synthesize_site(out=tmp_path / "c", cases=6, size=16, seed=1, site_shift=1.5).out
    )

    def stats(pairs: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]) -> tuple[float, ...]:
        images = np.concatenate([image.ravel() for image, _ in pairs])
        lesion = np.mean([label.mean() for _, label in pairs])
        noise = np.mean([np.std(image[:3, :3]) for image, _ in pairs])  # corner: background
        return float(images.mean()), float(images.std()), float(lesion), float(noise)

    a, b, c = stats(base), stats(reseeded), stats(shifted)
    assert a != b
    # a positive shift brightens, adds noise and enlarges lesions
    assert c[0] > a[0] * 1.3 and c[2] > a[2] * 1.3 and c[3] > a[3] * 1.5


def test_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "s"
    synthesize_site(out=out, cases=6, size=8, seed=0)
    with pytest.raises(DataError, match="not empty") as caught:
        synthesize_site(out=out, cases=4, size=8, seed=0)
    assert "--force" in (caught.value.hint or "")
    (out / ".medfed").mkdir()
    (out / ".medfed" / "ledger.jsonl").write_text("{}\n")
    synthesize_site(out=out, cases=4, size=8, seed=0, overwrite=True)
    assert len(list((out / "images").glob("*.nii.gz"))) == 4
    assert len(load_manifest(out / "manifest.csv")) == 4
    assert (out / ".medfed" / "ledger.jsonl").read_text() == "{}\n"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 3 cases"):
        synthesize_site(out=tmp_path / "x", cases=2, size=16, seed=0)
    with pytest.raises(DataError, match="spatial_dims"):
        synthesize_site(out=tmp_path / "x", cases=3, size=16, seed=0, spatial_dims=4)
    with pytest.raises(ConfigError, match="not a valid site id"):
        synthesize_site(out=tmp_path / "x", cases=3, size=16, seed=0, site_id="bad id!")
    assert not (tmp_path / "x").exists()
