"""A real federation (in-process grid, real DP-SGD and ledgers) logged to MLflow.

Once to the embedded SQLite store, once to an `mlflow server` on loopback. Every MLflow run
is ended by the tracker; the tests read them back with an explicit client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from medfed.api.demo import prepare_federation
from medfed.tracking import default_tracking_uri
from medfed.tracking.info import read_tracking_info
from medfed.transport.inprocess import run_in_process
from medfed.transport.processes import free_port
from medfed.workspace import RunPaths

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port (SQLite backend, proxied artifacts)."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=tmp_path,
        start_new_session=True,  # its own process group: the uvicorn worker is stopped with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        yield uri
    finally:
        with_group = process.pid
        try:
            os.killpg(with_group, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.close()


def _wait_until_up(uri: str, *, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"mlflow server at {uri} did not come up")
        time.sleep(0.5)


def _check_logged_run(setup: Any, uri: str, rounds: int) -> None:
    run_dir = setup.workspace.root / "runs" / setup.settings.run_name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == rounds
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert not RunPaths(directory=run_dir).mlflow_pending.exists()

    info = read_tracking_info(paths=RunPaths(directory=run_dir))
    assert info is not None and info.tracking_uri == uri
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([info.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    parent = client.get_run(info.parent_run_id)
    assert parent.info.run_name == "demo"
    assert parent.data.params["rounds"] == str(rounds)
    assert parent.data.tags["medfed.sites"] == "site-a,site-b"
    children = {
        r.data.tags.get("medfed.site_id"): r for r in runs if r.info.run_id != parent.info.run_id
    }
    assert sorted(children) == ["site-a", "site-b"]
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id

    # Epsilon per round: the parent's max and each site's spend are the run's own numbers.
    done = {e["round"]: e for e in events if e["event"] == "round_done"}
    history = client.get_metric_history(parent.info.run_id, "epsilon_max")
    assert {m.step: m.value for m in history} == {
        r: max(e["epsilon"].values()) for r, e in done.items()
    }
    dice = client.get_metric_history(parent.info.run_id, "dice_global")
    assert sorted(m.step for m in dice) == list(range(1, rounds + 1))
    for site in summary["sites"]:
        child = children[site["site_id"]]
        spent = client.get_metric_history(child.info.run_id, "epsilon_spent")
        assert sorted(m.step for m in spent) == list(range(1, rounds + 1))
        last = max(spent, key=lambda m: m.step)
        assert last.value == pytest.approx(site["epsilon_spent"], rel=1e-12)
        remaining = client.get_metric_history(child.info.run_id, "epsilon_remaining")
        assert max(remaining, key=lambda m: m.step).value == pytest.approx(
            site["epsilon_cap"] - site["epsilon_spent"]
        )

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ledgers", "plots", "summary.json", "budget_state.json", "audit"} <= artifacts
    audit = {a.path for a in client.list_artifacts(parent.info.run_id, "audit")}
    assert audit == {
        "audit/audit_report.html",
        "audit/audit_report.json",
        "audit/audit_report.pdf",
        "audit/audit_sites.csv",
    }
    ledgers = {a.path for a in client.list_artifacts(parent.info.run_id, "ledgers")}
    assert ledgers == {"ledgers/site-a.ledger.jsonl", "ledgers/site-b.ledger.jsonl"}

    # The final model: registered, its version tags carry each site's epsilon and delta.
    version = client.get_model_version("medfed-demo", "1")
    assert version.run_id == parent.info.run_id
    assert version.tags["medfed.privacy_unit"] == "patient"
    assert version.tags["medfed.rounds"] == str(rounds)
    for site in summary["sites"]:
        budget = summary["budgets"]["sites"][site["site_id"]]
        assert float(version.tags[f"medfed.epsilon.{site['site_id']}"]) == budget["epsilon_spent"]
        assert float(version.tags[f"medfed.delta.{site['site_id']}"]) == budget["delta"]
        assert version.tags[f"medfed.accountant.{site['site_id']}"] == budget["accountant"]
    assert version.tags["medfed.accountant"] == "rdp"
    assert parent.data.tags["medfed.model_format"] == "mlflow.pytorch (pt2)"


def test_an_in_process_federation_is_logged_to_sqlite(tmp_path: Path) -> None:
    setup = prepare_federation(root=tmp_path / "fed", sites=2, cases=16, rounds=2, local_epochs=1)
    uri = default_tracking_uri(workspace_root=setup.workspace.root)
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        tracking_uri=uri,
    )
    assert result.status == "finished", result.reason
    _check_logged_run(setup, uri, rounds=2)

    # The registered model loads with torch alone and segments a batch of any size.
    import mlflow.pytorch
    import torch

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("medfed-demo", "1")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    network = mlflow.pytorch.load_model(logged.artifact_location)
    with torch.no_grad():
        output = network(torch.zeros((1, 1, 32, 32, 32)))
    assert tuple(output.shape) == (1, 2, 32, 32, 32) and np.isfinite(output.numpy()).all()


def test_a_federation_is_logged_to_a_tracking_server(tmp_path: Path, mlflow_server: str) -> None:
    setup = prepare_federation(root=tmp_path / "fed", sites=2, cases=16, rounds=2, local_epochs=1)
    _wait_until_up(mlflow_server)
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        tracking_uri=mlflow_server,
    )
    assert result.status == "finished", result.reason
    _check_logged_run(setup, mlflow_server, rounds=2)
    assert not (tmp_path / "fed" / "workspace" / "mlflow.db").exists()  # the server's, not ours
