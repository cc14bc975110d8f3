"""Bad data costs nothing: every kind of broken case stops `site train` and a federated round
before the ledger is touched, with one line naming the file, and no traceback."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from flwr.app import Context, Message
from nibabel.eulerangles import euler2mat
from site_support import round_request

from medfed.config import SiteConfig, load_site_config
from medfed.data.synth import synthesize_site
from medfed.envelope import request_content
from medfed.errors import DataError

pytestmark = pytest.mark.slow

RunMedfed = Callable[..., CompletedProcess[str]]
IMAGE = Path("images/case_000.nii.gz")
LABEL = Path("labels/case_000.nii.gz")


@dataclass(frozen=True)
class Defect:
    """A way to break case 000: the file it leaves bad, what the line must say, settings."""

    name: str
    breaks: Callable[[Path], Path]
    says: str
    data_settings: tuple[tuple[str, Any], ...] = ()


def _volume(site: Path, relative: Path = IMAGE) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(site / relative)
    return np.asanyarray(img.dataobj), np.asarray(img.affine)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _point_manifest(site: Path, image: str) -> None:
    manifest = site / "manifest.csv"
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace(str(IMAGE), image, 1), encoding="utf-8")


def _random_bytes(site: Path) -> Path:
    (site / IMAGE).write_bytes(os.urandom(4000))
    return site / IMAGE


def _text_file(site: Path) -> Path:
    (site / "images/case_000.txt").write_text("patient notes, not a scan\n", encoding="utf-8")
    _point_manifest(site, "images/case_000.txt")
    return site / "images/case_000.txt"


def _shape_mismatch(site: Path) -> Path:
    label, affine = _volume(site, LABEL)
    return _save(site / LABEL, label[:, :, :-1], affine)


def _all_zero(site: Path) -> Path:
    image, affine = _volume(site)
    return _save(site / IMAGE, np.zeros_like(image), affine)


def _oblique(site: Path) -> Path:
    image, affine = _volume(site)
    rotated = affine.copy()
    rotated[:3, :3] = euler2mat(0.3, 0, 0) @ affine[:3, :3]
    _save(site / LABEL, _volume(site, LABEL)[0], rotated)
    return _save(site / IMAGE, image, rotated)


def _four_d(site: Path) -> Path:
    image, affine = _volume(site)
    return _save(site / IMAGE, np.repeat(image[..., None], 3, axis=3), affine)


def _nan_voxels(site: Path) -> Path:
    image, affine = _volume(site)
    image = image.astype(np.float32)
    image[1, 2, 3], image[4, 5, 6] = np.nan, np.inf
    return _save(site / IMAGE, image, affine)


def _unknown_classes(site: Path) -> Path:
    label, affine = _volume(site, LABEL)
    label = label.copy()
    label[label == 1] = 3
    label[0, 0, 0] = 7
    return _save(site / LABEL, label, affine)


def _truncated(site: Path) -> Path:
    data = (site / IMAGE).read_bytes()
    (site / IMAGE).write_bytes(data[: len(data) // 2])
    return site / IMAGE


def _gzip_in_nii(site: Path) -> Path:
    shutil.copy(site / IMAGE, site / "images/case_000.nii")
    _point_manifest(site, "images/case_000.nii")
    return site / "images/case_000.nii"


def _huge_header(site: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    path = site / "images/case_000.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4096)
    _point_manifest(site, "images/case_000.nii")
    return path


def _missing(site: Path) -> Path:
    (site / IMAGE).unlink()
    return site / IMAGE


def _zero_voxel_size(site: Path) -> Path:
    image, affine = _volume(site)
    img = nib.Nifti1Image(image, affine)
    img.header["pixdim"][1] = 0
    nib.save(img, site / IMAGE)
    return site / IMAGE


def _singular_affine(site: Path) -> Path:
    image, affine = _volume(site)
    singular = affine.copy()
    singular[:3, 0] = 0
    for relative, data in ((IMAGE, image), (LABEL, _volume(site, LABEL)[0])):
        img = nib.Nifti1Image(data, None)
        img.set_sform(singular, code=1)
        img.set_qform(None, code=0)
        nib.save(img, site / relative)
    return site / IMAGE


DEFECTS = [
    Defect("random-bytes", _random_bytes, "cannot be read as NIfTI"),
    Defect("text-file", _text_file, "cannot be read as NIfTI"),
    Defect("shape-mismatch", _shape_mismatch, "does not match image shape"),
    Defect("all-zero", _all_zero, "image is all zeros"),
    Defect("oblique", _oblique, "oblique affine", (("strict_geometry", True),)),
    Defect("four-d", _four_d, "is not 3-D"),
    Defect("nan-inf", _nan_voxels, "2 NaN/Inf voxels"),
    Defect("classes-3-7", _unknown_classes, "label values [3, 7] are not in classes"),
    Defect("truncated", _truncated, "voxel data cannot be read"),
    Defect("gzip-in-nii", _gzip_in_nii, "cannot be read as NIfTI"),
    Defect("huge-header", _huge_header, "30000x30000x30000"),
    Defect("missing", _missing, "file not found"),
    Defect("zero-voxel-size", _zero_voxel_size, "voxel sizes (0,"),
    Defect("singular-affine", _singular_affine, "not invertible", (("strict_geometry", True),)),
]


@pytest.fixture(scope="module")
def trained_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic site that trained one round: its ledger has entries to keep intact."""
    from medfed.site.trainer import train_local

    root = tmp_path_factory.mktemp("bad-data") / "site"
    result = synthesize_site(out=root, cases=6, size=16, seed=0, site_id="site-a")
    train_local(config=load_site_config(result.config), epochs=1, evaluate=False)
    return root


@pytest.fixture
def broken(trained_site: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    def make(defect: Defect) -> tuple[Path, Path, bytes]:
        site = tmp_path / "site"
        shutil.copytree(trained_site, site)
        if defect.data_settings:
            config_file = site / "site.yaml"
            raw = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            raw["data"].update(dict(defect.data_settings))
            config_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
        bad = defect.breaks(site)
        return site, bad, _ledger_bytes(site)

    yield make


def _ledger_bytes(site: Path) -> bytes:
    ledger = site / ".medfed" / "ledger.jsonl"
    head = ledger.with_name("ledger.jsonl.head")
    return ledger.read_bytes() + b"|" + head.read_bytes()


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_site_train_refuses_a_bad_case_before_the_ledger(
    defect: Defect, broken: Callable[[Defect], tuple[Path, Path, bytes]], run_medfed: RunMedfed
) -> None:
    site, bad, ledger_before = broken(defect)
    train = run_medfed("site", "train", "--config", "site/site.yaml", cwd=site.parent)
    assert train.returncode == DataError.exit_code, train.stdout + train.stderr
    lines = train.stderr.strip().splitlines()
    assert len(lines) == 1, train.stderr
    assert lines[0].startswith("error[data]: 1 of 6 cases in ")
    assert str(bad) in lines[0] and defect.says in lines[0], lines[0]
    assert "Traceback" not in train.stderr + train.stdout
    assert _ledger_bytes(site) == ledger_before


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_a_federated_round_declines_a_bad_case_before_the_ledger(
    defect: Defect,
    broken: Callable[[Defect], tuple[Path, Path, bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from medfed.site.clientapp import app

    site, bad, ledger_before = broken(defect)
    config = load_site_config(site / "site.yaml")
    reply = app(_train_message(config), _context(site))
    assert reply.has_error()
    # the aggregator learns that the dataset failed its check, not which case or file
    assert reply.error.reason.startswith("error[data]: the dataset failed its check")
    assert str(site) not in reply.error.reason and "case_000" not in reply.error.reason
    # the node's log points at the site's list of problems, which names the file
    declines = [r.getMessage() for r in caplog.records if "declines train" in r.getMessage()]
    assert len(declines) == 1 and str(bad) not in declines[0]
    listed = site / ".medfed" / "data-problems.txt"
    assert str(listed) in declines[0] and listed.stat().st_mode & 0o077 == 0
    problems = listed.read_text(encoding="utf-8")
    assert str(bad) in problems and defect.says in problems
    assert _ledger_bytes(site) == ledger_before


def test_a_site_may_leave_bad_cases_out(
    broken: Callable[[Defect], tuple[Path, Path, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    from medfed.data import build_datasets

    site, bad, _ = broken(Defect("exclude", _all_zero, "", (("bad_cases", "exclude"),)))
    datasets = build_datasets(load_site_config(site / "site.yaml"))
    kept = {case.patient_id for case in (*datasets.train_cases, *datasets.val_cases)}
    assert len(kept) == 5 and "site-a-p000" not in kept
    assert any(
        str(bad) in r.getMessage() and "leaving out" in r.getMessage() for r in caplog.records
    )


def test_an_oblique_scan_is_a_warning_by_default(
    broken: Callable[[Defect], tuple[Path, Path, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    from medfed.data import build_datasets

    site, bad, _ = broken(Defect("oblique-default", _oblique, ""))
    datasets = build_datasets(load_site_config(site / "site.yaml"))
    assert len(datasets.train_cases) + len(datasets.val_cases) == 6
    assert any(
        str(bad) in r.getMessage() and "warning: oblique affine" in r.getMessage()
        for r in caplog.records
    )


def test_a_checked_case_is_not_read_again_until_its_file_changes(
    broken: Callable[[Defect], tuple[Path, Path, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.data import screen

    site, _, _ = broken(Defect("none", lambda site: site / IMAGE, ""))
    config = load_site_config(site / "site.yaml")
    read: list[str] = []
    real = screen.check_case

    def counting(case: Any, settings: Any) -> Any:
        read.append(case.patient_id)
        return real(case, settings)

    monkeypatch.setattr(screen, "check_case", counting)
    screen.screen_cases(_cases(config), data=config.data, cache_dir=config.cache_dir)
    first = len(read)
    screen.screen_cases(_cases(config), data=config.data, cache_dir=config.cache_dir)
    assert first == 6 and len(read) == 6
    _all_zero(site)  # rewritten: a new size/mtime/inode
    with pytest.raises(DataError, match="image is all zeros"):
        screen.screen_cases(_cases(config), data=config.data, cache_dir=config.cache_dir)
    assert read[6:] == ["site-a-p000"]


def _cases(config: SiteConfig) -> list[Any]:
    from medfed.data.manifest import load_manifest

    return load_manifest(config.data.manifest)


def _train_message(config: SiteConfig) -> Message:
    from medfed.site.federated import initial_model

    request = round_request(
        model=config.model.model_dump(), local_epochs=1, ledger_known=0, run_name="study"
    )
    weights = initial_model(config=config, request=request).weights
    content = request_content(dataclasses.replace(request, weights=weights))
    return Message(content, dst_node_id=1, message_type="train")


def _context(site: Path) -> Context:
    from flwr.app import RecordDict

    return Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(site / "site.yaml")},
        state=RecordDict(),
        run_config={},
    )
