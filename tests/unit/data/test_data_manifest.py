"""Manifest parsing and train/val splitting."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from medfed.data.manifest import Case, load_manifest, split_cases
from medfed.errors import DataError


def _cases(n: int, split: str | None = None) -> list[Case]:
    return [
        Case(f"p{i:03d}", Path(f"/d/img{i}.nii.gz"), Path(f"/d/lab{i}.nii.gz"), split)  # type: ignore[arg-type]
        for i in range(n)
    ]


def test_csv_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "m.csv").write_text(
        "patient_id,image,label,split\n"
        "a,images/a.nii.gz,labels/a.nii.gz,train\n"
        "\n"
        " b , ../other/b.nii.gz , /abs/b_label.nii.gz , VAL\n"
        "c,images/c.nii.gz,labels/c.nii.gz,\n"
    )
    cases = load_manifest(folder / "m.csv")
    assert [c.patient_id for c in cases] == ["a", "b", "c"]
    assert cases[0].image == folder.absolute() / "images" / "a.nii.gz"
    assert cases[1].image == tmp_path.absolute() / "other" / "b.nii.gz"
    assert cases[1].label == Path("/abs/b_label.nii.gz")
    assert [c.split for c in cases] == ["train", "val", None]


def test_csv_without_split_column(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("patient_id,image,label\nx,i.nii,l.nii\n")
    assert load_manifest(tmp_path / "m.csv") == [
        Case("x", tmp_path.absolute() / "i.nii", tmp_path.absolute() / "l.nii", None)
    ]


@pytest.mark.parametrize("wrapped", [False, True])
def test_yaml_list_and_cases_mapping(tmp_path: Path, wrapped: bool) -> None:
    body = (
        "- {patient_id: p1, image: i1.nii.gz, label: l1.nii.gz}\n"
        "- {patient_id: 2, image: i2.nii.gz, label: l2.nii.gz, split: val}\n"
    )
    if wrapped:
        body = "cases:\n" + "".join("  " + line + "\n" for line in body.splitlines())
    (tmp_path / "m.yaml").write_text(body)
    cases = load_manifest(tmp_path / "m.yaml")
    assert [(c.patient_id, c.split) for c in cases] == [("p1", None), ("2", "val")]
    assert cases[1].label == tmp_path.absolute() / "l2.nii.gz"


def test_csv_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "patient_id,image,label,split,notes\n"
        "ok,i.nii,l.nii,train,\n"
        ",i2.nii,l2.nii,train,\n"
        "p3,i3.nii,l3.nii,test,\n"
        "p4,i4.nii,,val,\n"
    )
    with pytest.raises(DataError) as caught:
        load_manifest(path)
    message = caught.value.message
    assert "4 problems" in message
    assert f"{path}:1: unknown column(s) notes" in message
    assert f"{path}:3: empty patient_id" in message
    assert f"{path}:4: split must be 'train', 'val' or empty, got 'test'" in message
    assert f"{path}:5: empty label" in message
    assert caught.value.hint


def test_csv_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("patient_id,img\np1,a.nii\n")
    with pytest.raises(DataError) as caught:
        load_manifest(path)
    assert "missing column(s) image, label" in caught.value.message
    assert "unknown column(s) img" in caught.value.message


def test_yaml_reports_every_problem_with_case_number(tmp_path: Path) -> None:
    path = tmp_path / "m.yml"
    path.write_text(
        "- {patient_id: p1, image: a, label: b}\n"
        "- just a string\n"
        "- {patient_id: '', image: a, label: b, extra: 1}\n"
        "- {patient_id: p4, image: [a], label: b, split: training}\n"
    )
    with pytest.raises(DataError) as caught:
        load_manifest(path)
    message = caught.value.message
    assert f"{path}: case 2: expected a mapping" in message
    assert f"{path}: case 3: unknown column(s) extra" in message
    assert f"{path}: case 3: empty patient_id" in message
    assert f"{path}: case 4: image must be a single value" in message
    assert f"{path}: case 4: split must be" in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.csv", None, "manifest not found"),
        ("m.txt", "patient_id,image,label\n", "unknown manifest format"),
        ("m.csv", "patient_id,image,label\n", "no cases"),
        ("m.yaml", "key: [unclosed\n", "not valid YAML"),
        ("m.yaml", "patients: []\n", "expected a list of cases"),
    ],
)
def test_unusable_manifests(tmp_path: Path, name: str, text: str | None, expected: str) -> None:
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=expected):
        load_manifest(tmp_path / name)


def test_split_is_deterministic_and_order_independent() -> None:
    cases = _cases(50)
    train, val = split_cases(cases, val_fraction=0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert {c.patient_id for c in train}.isdisjoint(c.patient_id for c in val)
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)
    _, val_again = split_cases(shuffled, val_fraction=0.2, seed=7)
    assert {c.patient_id for c in val_again} == {c.patient_id for c in val}
    _, val_other = split_cases(cases, val_fraction=0.2, seed=8)
    assert {c.patient_id for c in val_other} != {c.patient_id for c in val}
    # manifest order is kept within each side
    assert train == [c for c in cases if c in train]


def test_split_minimums() -> None:
    train, val = split_cases(_cases(2), val_fraction=0.05, seed=0)
    assert (len(train), len(val)) == (1, 1)
    train, val = split_cases(_cases(1), val_fraction=0.5, seed=0)
    assert (len(train), len(val)) == (1, 0)
    train, val = split_cases(_cases(5), val_fraction=0.0, seed=0)
    assert (len(train), len(val)) == (5, 0)
    train, val = split_cases(_cases(3), val_fraction=0.9, seed=0)
    assert (len(train), len(val)) == (1, 2)


def test_split_honours_explicit_values() -> None:
    cases = (
        _cases(4, "train")
        + _cases(6, None)[4:]
        + [Case("v", Path("/v.nii"), Path("/vl.nii"), "val")]
    )
    train, val = split_cases(cases, val_fraction=0.5, seed=1)
    assert all(c.patient_id != "v" for c in train)
    assert "v" in {c.patient_id for c in val}
    assert {"p000", "p001", "p002", "p003"} <= {c.patient_id for c in train}
    # the two open cases are split by the fraction: one each way
    assert len(train) == 5 and len(val) == 2


def test_split_without_training_cases_is_an_error() -> None:
    with pytest.raises(DataError, match="no training cases"):
        split_cases(_cases(3, "val"), val_fraction=0.2, seed=0)
    both = [_cases(1, "train")[0], _cases(1, "val")[0]]
    with pytest.raises(DataError, match="both as train and val"):
        split_cases(both, val_fraction=0.2, seed=0)
