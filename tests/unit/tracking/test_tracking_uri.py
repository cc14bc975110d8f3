"""Which tracking store a run logs to, and the store's one-time initialisation."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.errors import ConfigError
from medfed.tracking import default_tracking_uri, prepare_store, resolve_tracking_uri
from medfed.tracking.uri import artifact_location, is_server, sqlite_path


def test_the_default_is_an_absolute_sqlite_database_in_the_workspace(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path / "ws")
    assert uri == f"sqlite:///{tmp_path}/ws/mlflow.db" and uri.startswith("sqlite:////")
    assert sqlite_path(uri) == tmp_path / "ws" / "mlflow.db"
    relative = default_tracking_uri(workspace_root=Path("ws"))
    assert sqlite_path(relative) == Path.cwd() / "ws" / "mlflow.db"


def test_explicit_beats_the_environment_which_beats_the_default(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://tracking:5000"}
    explicit = "https://mlflow.example.org"
    assert resolve_tracking_uri(workspace_root=tmp_path, explicit=explicit, environ=env) == explicit
    assert resolve_tracking_uri(workspace_root=tmp_path, environ=env) == env["MLFLOW_TRACKING_URI"]
    assert resolve_tracking_uri(workspace_root=tmp_path, environ={}) == default_tracking_uri(
        workspace_root=tmp_path
    )
    blank = {"MLFLOW_TRACKING_URI": " "}
    assert resolve_tracking_uri(workspace_root=tmp_path, explicit="", environ=blank) == (
        default_tracking_uri(workspace_root=tmp_path)
    )


def test_a_relative_sqlite_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(workspace_root=tmp_path, explicit="sqlite:///runs/m.db?timeout=5")
    assert uri == f"sqlite:///{tmp_path}/runs/m.db?timeout=5"
    assert sqlite_path(uri) == tmp_path / "runs" / "m.db"
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "/tmp/mlruns", "mlruns", "C:\\mlruns"])
def test_plain_file_stores_are_refused_with_a_hint(tmp_path: Path, uri: str) -> None:
    with pytest.raises(ConfigError, match="file store") as raised:
        resolve_tracking_uri(workspace_root=tmp_path, explicit=uri)
    assert raised.value.hint is not None and "sqlite" in raised.value.hint


def test_servers_are_recognised_and_not_touched(tmp_path: Path) -> None:
    assert is_server("http://127.0.0.1:5000") and is_server("https://x")
    assert not is_server(default_tracking_uri(workspace_root=tmp_path))
    started = time.monotonic()
    assert prepare_store(uri="http://127.0.0.1:9") is None  # nothing listens there
    assert time.monotonic() - started < 1.0
    assert artifact_location("http://127.0.0.1:9") is None


@pytest.mark.slow
def test_prepare_store_creates_the_database_and_experiment_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = default_tracking_uri(workspace_root=tmp_path / "ws")
    first = prepare_store(uri=uri)
    assert first is not None and (tmp_path / "ws" / "mlflow.db").is_file()
    assert prepare_store(uri=uri) == first
    experiment = MlflowClient(tracking_uri=uri).get_experiment(first)
    assert experiment.name == "medfed"
    assert experiment.artifact_location == (tmp_path / "ws" / "mlartifacts").as_uri()


@pytest.mark.slow
def test_concurrent_first_writers_share_one_store(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path / "ws")
    code = "import sys; from medfed.tracking import prepare_store as p; print(p(uri=sys.argv[1]))"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [r[1][-2000:] for r in results]
    ids = {out.decode().strip().splitlines()[-1] for out, _ in results}
    assert len(ids) == 1


def test_an_unwritable_store_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot initialise the MLflow store"):
        prepare_store(uri=default_tracking_uri(workspace_root=blocker / "ws"))
