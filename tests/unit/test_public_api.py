"""The curated public API: exactly these names, all importable, and a light ``import medfed``."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import medfed
from medfed.api.progress import TextProgress, progress_callback
from medfed.errors import ConfigError, MedfedError
from medfed.run_events import RoundStarted, RunEvent

PUBLIC = {
    "FederationResults",
    "LocalDeployment",
    "MedfedError",
    "RunSettings",
    "SiteConfig",
    "SubmittedRun",
    "SyntheticSites",
    "__version__",
    "build_report",
    "load_results",
    "load_site_config",
    "make_synthetic_sites",
    "plan_epsilon",
    "plan_noise",
    "run_federation",
    "start_local_deployment",
    "submit_run",
    "verify_workspace",
}
HEAVY = ("torch", "flwr", "mlflow", "monai", "opacus", "pandas")


def test_all_is_exactly_the_curated_api() -> None:
    assert set(medfed.__all__) == PUBLIC
    assert len(medfed.__all__) == len(PUBLIC)
    assert medfed.__version__ == "0.1.0"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from medfed import {name}", namespace)
    assert namespace[name] is getattr(medfed, name)
    assert name in dir(medfed)


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'run_simulation'"):
        medfed.run_simulation  # type: ignore[attr-defined]  # noqa: B018


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(done.stdout.split())


def test_import_medfed_loads_no_heavy_library() -> None:
    assert _modules_after("import medfed") == set()


def test_looking_up_every_public_name_still_loads_no_heavy_library() -> None:
    # Heavy libraries are imported inside the functions that need them, when they run.
    code = "import medfed\nfor name in medfed.__all__: getattr(medfed, name)"
    assert _modules_after(code) == set()


def test_errors_are_medfed_errors_with_codes() -> None:
    assert issubclass(ConfigError, medfed.MedfedError)
    assert medfed.MedfedError is MedfedError


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sites": 0}, "between 1 and 26"),
        ({"sites": 27}, "between 1 and 26"),
        ({"cases": 2}, "at least 3"),
        ({"size": 4}, "at least 8"),
        ({"epsilon_cap": 0.0}, "epsilon_cap"),
        ({"delta": 1.5}, "delta"),
        ({"training": {"optimzer": "sgd"}}, "training: optimzer: unknown setting"),
    ],
)
def test_bad_synthetic_sites_are_refused_before_anything_is_written(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    root = tmp_path / "study"
    with pytest.raises(MedfedError, match=message):
        medfed.make_synthetic_sites(root=root, **arguments)  # type: ignore[arg-type]
    assert not root.exists()


def test_synthetic_sites_take_training_settings_and_full_batches(tmp_path: Path) -> None:
    sites = medfed.make_synthetic_sites(
        root=tmp_path / "study",
        sites=2,
        cases=6,
        size=8,
        training={"optimizer": "sgd"},
        full_batch=True,
    )
    for site in sites.sites:
        training = sites.config(site).training
        assert training.optimizer == "sgd"
        assert training.batch_size == sites.train_patients[site] == 5


def test_synthetic_sites_refuse_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty directory") as caught:
        medfed.make_synthetic_sites(root=tmp_path)
    assert caught.value.hint
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_run_federation_needs_settings_and_a_workspace_for_plain_configs(tmp_path: Path) -> None:
    settings = medfed.RunSettings(run_name="study-1")
    with pytest.raises(ConfigError, match="workspace"):
        medfed.run_federation(sites={"site-a": tmp_path / "site.yaml"}, settings=settings)
    with pytest.raises(ConfigError, match="RunSettings"):
        medfed.run_federation(
            sites={"site-a": tmp_path / "site.yaml"},
            settings={"run_name": "study-1"},  # type: ignore[arg-type]
            workspace=tmp_path,
        )


def test_progress_prints_one_line_per_event_outside_a_notebook() -> None:
    stream = io.StringIO()
    show = TextProgress(stream=stream)
    show(RoundStarted(run_name="study", round=1, sites=("site-a", "site-b")))
    show(RunEvent(run_name="study"))  # an event without a line prints nothing
    assert stream.getvalue() == "round 1: training at site-a, site-b\n"
    assert isinstance(progress_callback(True), TextProgress)
    assert progress_callback(False) is None
    with pytest.raises(ConfigError, match="progress"):
        progress_callback("yes")  # type: ignore[arg-type]
