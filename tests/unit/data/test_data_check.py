"""`check_dataset` and `medfed data check` on broken and good datasets."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app, main
from medfed.config.loading import dump_site_config
from medfed.config.site import DataSection, SiteConfig
from medfed.data.manifest import Case
from medfed.data.synth import synthesize_site
from medfed.data.validate import check_dataset
from medfed.errors import ConfigError, DataError

CaseMaker = Callable[..., tuple[Path, Path]]


@pytest.fixture
def broken(tmp_path: Path, make_case: CaseMaker, write_nifti: Callable[..., Path]) -> Path:
    """A manifest with one good case and one case per kind of problem."""
    rows = []

    def add(pid: str, image: Path, label: Path) -> None:
        rows.append(f"{pid},{image.relative_to(tmp_path)},{label.relative_to(tmp_path)}")

    add("good", *make_case("good"))
    image, label = make_case("shape")
    short = np.zeros((16, 16, 15), np.uint8)
    short[4:6, 4:6, 4:6] = 1
    write_nifti(label, short)
    add("shape", image, label)
    image, label = make_case("affine")
    moved = np.eye(4)
    moved[0, 3] = 2.0
    write_nifti(label, np.asanyarray(nib.load(label).dataobj), moved)
    add("affine", image, label)
    add("values", *make_case("values", label_values=(0, 7)))
    image, label = make_case("nan")
    data = np.ones((16, 16, 16), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    write_nifti(image, data)
    add("nan", image, label)
    image, label = make_case("empty")
    write_nifti(label, np.zeros((16, 16, 16), np.uint8))
    add("empty", image, label)
    image, label = make_case("missing")
    image.unlink()
    add("missing", image, label)
    image, label = make_case("text")
    label.write_text("this is not an image\n")
    add("text", image, label)
    image, label = make_case("fraction")
    write_nifti(label, np.full((16, 16, 16), 0.5, np.float32))
    add("fraction", image, label)
    image, label = make_case("flat")
    write_nifti(image, np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    add("flat", image, label)
    good_image, good_label = (
        tmp_path / "images" / "good.nii.gz",
        tmp_path / "labels" / "good.nii.gz",
    )
    add("good", good_image, good_label)  # the same patient twice
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,image,label\n" + "\n".join(rows) + "\n")
    return manifest


def test_every_problem_is_found(broken: Path) -> None:
    report = check_dataset(manifest=broken, classes=[0, 1], spatial_dims=3)
    lines = [problem.line() for problem in report.problems]
    text = "\n".join(lines)

    def has(pid: str, file: str, fragment: str) -> bool:
        return any(
            line.startswith(f"{pid} ") and file in line and fragment in line for line in lines
        )

    assert has("shape", "labels/shape.nii.gz", "label shape 16x16x15 does not match image shape"), (
        text
    )
    assert has("affine", "labels/affine.nii.gz", "label affine differs"), text
    assert has("values", "labels/values.nii.gz", "label values [7] are not in classes [0, 1]"), text
    assert has("nan", "images/nan.nii.gz", "image has 2 NaN/Inf voxels"), text
    assert has("empty", "labels/empty.nii.gz", "label has no foreground"), text
    assert has("missing", "images/missing.nii.gz", "file not found"), text
    assert has("text", "labels/text.nii.gz", "cannot be read as NIfTI"), text
    assert has("fraction", "labels/fraction.nii.gz", "not integer-valued"), text
    assert has("flat", "images/flat.nii.gz", "is not 3-D"), text
    assert has("good", "images/good.nii.gz", "duplicate patient id"), text
    assert report.n_cases == 11 and len(report.problems) == 10, text
    # every case but the first "good" is bad
    assert report.n_bad == 10 and not report.ok
    assert report.n_warnings == 0, text


def test_empty_labels_are_warnings_when_negative_cases_are_allowed(broken: Path) -> None:
    report = check_dataset(manifest=broken, classes=[0, 1], spatial_dims=3, allow_empty_labels=True)
    empty = [p for p in report.problems if p.patient_id == "empty"]
    assert [p.severity for p in empty] == ["warning"]
    assert (
        empty[0].line().startswith("empty ")
        and "warning: label has no foreground" in empty[0].line()
    )
    assert report.n_bad == 9 and report.n_warnings == 1


def test_cli_lists_problems_and_fails(broken: Path, tmp_path: Path) -> None:
    config = SiteConfig(site_id="broken", data=DataSection(manifest=broken.name))
    dump_site_config(config, tmp_path / "site.yaml")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", "--config", str(tmp_path / "site.yaml")])
    assert result.exit_code == 3, result.output
    for name in ("shape", "affine", "values", "nan", "empty", "missing", "text", "fraction"):
        assert f"{name} " in result.output and f"/{name}.nii.gz:" in result.output
    assert "checked 11 cases: 10 bad" in result.output
    assert "Traceback" not in result.output

    as_json = runner.invoke(
        app, ["data", "check", "--config", str(tmp_path / "site.yaml"), "--json"]
    )
    assert as_json.exit_code == 3
    report = json.loads(as_json.output)
    assert report["n_bad"] == 10 and len(report["problems"]) == 10


def test_a_good_synthetic_dataset_passes(tmp_path: Path) -> None:
    runner = CliRunner()
    for dims in ("3", "2"):
        out = tmp_path / f"site{dims}"
        made = runner.invoke(
            app,
            ["data", "synth", "--out", str(out), "--cases", "4", "--size", "12", "--dims", dims],
        )
        assert made.exit_code == 0, made.output
        assert f"medfed data check --config {out / 'site.yaml'}" in made.output
        checked = runner.invoke(app, ["data", "check", "--config", str(out / "site.yaml")])
        assert checked.exit_code == 0, checked.output
        assert "checked 4 cases: no errors" in checked.output


def test_singleton_channel_and_two_d_slices_are_accepted(
    tmp_path: Path, write_nifti: Callable[..., Path]
) -> None:
    label = np.zeros((8, 9, 1), np.uint8)
    label[2:4, 2:4] = 1
    write_nifti(tmp_path / "i4.nii.gz", np.arange(432, dtype=np.float32).reshape(8, 9, 6, 1))
    write_nifti(tmp_path / "l4.nii.gz", np.repeat(label, 6, axis=2))
    write_nifti(tmp_path / "i2.nii.gz", np.arange(72, dtype=np.float32).reshape(8, 9, 1))
    write_nifti(tmp_path / "l2.nii.gz", label)
    volume = Case("v", tmp_path / "i4.nii.gz", tmp_path / "l4.nii.gz")
    assert check_dataset(cases=[volume], classes=[0, 1], spatial_dims=3).problems == ()
    sliced = Case("s", tmp_path / "i2.nii.gz", tmp_path / "l2.nii.gz")
    assert check_dataset(cases=[sliced], classes=[0, 1], spatial_dims=2).problems == ()
    wrong = check_dataset(cases=[volume], classes=[0, 1], spatial_dims=2)
    assert wrong.n_bad == 1 and "is not 2-D" in wrong.problems[0].message


def test_other_formats_and_shared_scans(
    tmp_path: Path, make_case: CaseMaker, write_nifti: Callable[..., Path]
) -> None:
    image, label = make_case("a")
    mgh = tmp_path / "a.mgz"
    nib.save(nib.MGHImage(np.zeros((16, 16, 16), np.float32), np.eye(4)), mgh)
    cases = [Case("a", mgh, label), Case("b", image, label), Case("c", image, label)]
    report = check_dataset(cases=cases, classes=[0, 1], spatial_dims=3)
    assert [p.line() for p in report.problems] == [
        f"a {mgh}: not a NIfTI image (nibabel reads it as MGHImage)",
        f"c {image}: same image file as patient b; one scan cannot belong to two patients",
    ]
    assert report.n_bad == 2


def test_missing_manifest_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SiteConfig(site_id="s", data=DataSection(manifest=Path("nowhere.csv")))
    dump_site_config(config, tmp_path / "site.yaml")
    result = CliRunner().invoke(app, ["data", "check", "--config", str(tmp_path / "site.yaml")])
    assert isinstance(result.exception, DataError)

    monkeypatch.setattr(
        sys, "argv", ["medfed", "data", "check", "--config", str(tmp_path / "site.yaml")]
    )
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == DataError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error[data]:") and "manifest not found" in err


def test_synth_refuses_to_overwrite(tmp_path: Path) -> None:
    synthesize_site(out=tmp_path / "s", cases=3, size=8, seed=0)
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--size", "8"])
    assert isinstance(result.exception, DataError) and "--force" in (result.exception.hint or "")
    forced = CliRunner().invoke(
        app,
        ["data", "synth", "--out", str(tmp_path / "s"), "--size", "8", "--cases", "3", "--force"],
    )
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("command", [["data", "check"], ["privacy", "ledger"], ["site", "train"]])
def test_every_command_reads_a_site_config_with_one_schema(
    tmp_path: Path, command: list[str]
) -> None:
    config = SiteConfig(site_id="s", data=DataSection(manifest="manifest.csv"))
    dump_site_config(config, tmp_path / "site.yaml")
    text = (tmp_path / "site.yaml").read_text(encoding="utf-8")
    (tmp_path / "site.yaml").write_text(text + "privacy:\n  epsilon_cap: .inf\n", encoding="utf-8")
    result = CliRunner().invoke(app, [*command, "--config", str(tmp_path / "site.yaml")])
    assert isinstance(result.exception, ConfigError), result.output
    assert "privacy.epsilon_cap: Input should be a finite number" in result.exception.message
