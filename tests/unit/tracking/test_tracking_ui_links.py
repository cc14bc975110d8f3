"""The command that starts the MLflow UI on a store, and the addresses of a run's pages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medfed.tracking import default_tracking_uri
from medfed.tracking.experiment import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from medfed.tracking.info import TrackingInfo, write_tracking_info
from medfed.tracking.ui_links import (
    MODEL_TRAINING_VIEW,
    experiment_url,
    model_version_url,
    run_ui_links,
    run_url,
    ui_base_url,
    ui_command,
    ui_links,
)
from medfed.workspace import RunPaths


def test_a_sqlite_store_gets_a_command_that_a_shell_reads_back(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path / "my workspace")
    command = ui_command(tracking_uri=uri)
    assert command is not None and command.startswith("mlflow ui --backend-store-uri ")
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri]
    other = ui_command(tracking_uri=uri, port=5077)
    assert other is not None and shlex.split(other)[-2:] == ["--port", "5077"]
    assert ui_base_url(tracking_uri=uri) == "http://127.0.0.1:5000/"
    assert ui_base_url(tracking_uri=uri, port=5077) == "http://127.0.0.1:5077/"


def test_a_server_is_its_own_ui_without_its_credentials() -> None:
    uri = "https://alice:s3cret@mlflow.example.org:8443/tracking/?token=abc#x"
    assert ui_command(tracking_uri=uri) is None
    base = ui_base_url(tracking_uri=uri)
    assert base == "https://mlflow.example.org:8443/tracking/"
    url = run_url(tracking_uri=uri, experiment_id="7", run_id="ab12")
    assert url == (
        "https://mlflow.example.org:8443/tracking/#/experiments/7/runs/ab12"
        "?workflowType=machine_learning"
    )
    assert "s3cret" not in url and "alice" not in url and "abc" not in url
    assert ui_base_url(tracking_uri="http://[::1]:5000") == "http://[::1]:5000/"
    # The redacted form that mlflow.json keeps gives the same address.
    assert ui_base_url(tracking_uri="https://alice:***@mlflow.example.org:8443/tracking") == base


def test_stores_with_credentials_in_their_uri_get_no_command() -> None:
    uri = "postgresql://mlflow:pw@db.example.org/mlflow"
    assert ui_command(tracking_uri=uri) is None and ui_base_url(tracking_uri=uri) is None
    assert experiment_url(tracking_uri=uri, experiment_id="1") is None
    assert run_url(tracking_uri=uri, experiment_id="1", run_id="r") is None


def test_the_pages_open_in_the_model_training_view(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path)
    assert experiment_url(tracking_uri=uri, experiment_id="1") == (
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    )
    assert run_url(tracking_uri=uri, experiment_id="1", run_id="f00d") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/f00d?workflowType=machine_learning"
    )
    assert model_version_url(tracking_uri=uri, name="medfed-my run", version="3") == (
        "http://127.0.0.1:5000/#/models/medfed-my%20run/versions/3?workflowType=machine_learning"
    )


def test_a_tracked_runs_links_come_from_its_mlflow_json(tmp_path: Path) -> None:
    paths = RunPaths(directory=tmp_path / "runs" / "demo")
    assert run_ui_links(paths=paths) is None  # not tracked
    uri = default_tracking_uri(workspace_root=tmp_path)
    info = TrackingInfo(tracking_uri=uri, experiment_id="4", parent_run_id="c0ffee")
    write_tracking_info(paths=paths, info=info)
    links = run_ui_links(paths=paths, port=5001)
    assert links == ui_links(info=info, port=5001)
    assert links is not None
    assert links.command == f"mlflow ui --backend-store-uri {uri} --port 5001"
    assert links.experiment == f"http://127.0.0.1:5001/#/experiments/4/runs?{MODEL_TRAINING_VIEW}"
    assert links.run == f"http://127.0.0.1:5001/#/experiments/4/runs/c0ffee?{MODEL_TRAINING_VIEW}"


def _ui_bundle() -> str:
    import mlflow

    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundles = sorted(build.glob("main.*.js"))
    if not bundles:
        pytest.skip(f"this MLflow has no UI bundle in {build}")
    return bundles[0].read_text(encoding="utf-8", errors="replace")


def test_the_installed_mlflow_ui_reads_these_names() -> None:
    """The tag, its value and the address parameter are MLflow's UI's own (its JS bundle)."""
    bundle = _ui_bundle()
    assert f'"{EXPERIMENT_KIND_TAG}"===' in bundle
    assert f'CUSTOM_MODEL_DEVELOPMENT="{MODEL_TRAINING_KIND}"' in bundle
    name, value = MODEL_TRAINING_VIEW.split("=")
    assert re.search(rf'\.get\("{name}"\)', bundle)
    assert f'MACHINE_LEARNING="{value}"' in bundle
