"""Federations on the real deployment: SuperLink and SuperNodes as processes on loopback.

TLS and node authentication are on in every test; each test stops every process it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfed.api.demo import DemoSetup, prepare_federation, start_site_nodes
from medfed.config import load_site_config
from medfed.privacy import SiteLedger
from medfed.transport.flwr_cli import wait_for_nodes, wait_for_run
from medfed.transport.processes import ManagedProcess, ProcessGroup, free_port
from medfed.transport.runner import follow, start_aggregator, submit

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, **kwargs: Any) -> DemoSetup:
    options: dict[str, Any] = {"sites": 3, "cases": 16, "size": 32, "rounds": 2, "local_epochs": 1}
    options.update(kwargs)
    return prepare_federation(root=tmp_path / "fed", port=free_port(), **options)


def _kill(process: ManagedProcess) -> None:
    """A hard crash of the process and everything it started (no clean shutdown)."""
    os.killpg(process.pgid, signal.SIGKILL)
    process.wait_for_exit(30)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in command:
                found.append(int(entry.name))
    return found


def _ledger(setup: DemoSetup, site: str) -> SiteLedger:
    config = load_site_config(setup.site_configs[site])
    return SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )


def _mlflow_statuses(setup: DemoSetup, runs: int | None = None) -> set[str]:
    """The statuses of the run's MLflow runs (parent and one per site) in the workspace store."""
    from mlflow import MlflowClient

    from medfed.tracking.info import read_tracking_info

    info = read_tracking_info(paths=setup.workspace.layout.run(setup.settings.run_name))
    assert info is not None
    found = MlflowClient(tracking_uri=info.tracking_uri).search_runs([info.experiment_id])
    assert len(found) == (runs or 1 + len(setup.site_configs))
    return {run.info.status for run in found}


def _events(setup: DemoSetup, run_id: int, timeout_s: float = 900) -> Iterator[dict[str, Any]]:
    """The run's events as they come, each as its line in the events file."""
    followed = follow(
        workspace=setup.workspace,
        run_name=setup.settings.run_name,
        run_id=run_id,
        timeout_s=timeout_s,
    )
    return (event.to_json() for event in followed)


def test_demo_command_runs_a_federation_over_tls_that_learns(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from medfed.cli.app import main; main()",
            "demo",
            "--workspace",
            str(root),
            "--sites",
            "2",
            "--rounds",
            "2",
            "--local-epochs",
            "5",  # the demo's own setting: with 3, two rounds gained 0.03-0.04 Dice in two runs
            "--cases",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run finished" in done.stdout
    summary = json.loads((root / "workspace/runs/demo/summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["dice_final"] > summary["dice_initial"] + 0.05
    for site in summary["sites"]:
        assert site["rounds"] == 2
        assert 0 < site["epsilon_spent"] <= site["epsilon_cap"]
    superlink_log = (root / "workspace/logs/superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log  # TLS on the one SuperLink port
    # The ServerApp logged the run to the workspace's MLflow store and ended its runs.
    from mlflow import MlflowClient

    from medfed.tracking.info import read_tracking_info
    from medfed.workspace import run_paths

    info = read_tracking_info(paths=run_paths(root / "workspace", "demo"))
    assert info is not None and f"MLflow run {info.parent_run_id}" in done.stdout
    assert info.tracking_uri == f"sqlite:///{root.absolute() / 'workspace' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=info.tracking_uri)
    runs = client.search_runs([info.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    version = client.get_model_version("medfed-demo", "1")
    for site in summary["sites"]:
        assert float(version.tags[f"medfed.epsilon.{site['site_id']}"]) == site["epsilon_spent"]
    # Nothing left running: no process mentions the demo's directory any more.
    assert _processes_mentioning(str(root)) == []


def test_a_killed_site_is_left_out_and_too_few_sites_end_the_run_cleanly(
    tmp_path: Path,
) -> None:
    setup = _setup(tmp_path, rounds=3)
    settings = setup.settings.model_copy(update={"min_sites": 2, "round_timeout_s": 90.0})
    with ProcessGroup() as group:
        group.add(start_aggregator(workspace=setup.workspace).process)
        nodes = start_site_nodes(group=group, setup=setup)
        run_id = submit(workspace=setup.workspace, settings=settings)
        seen: list[dict[str, Any]] = []
        for event in _events(setup, run_id):
            seen.append(event)
            if event["event"] == "round_started" and event["round"] == 1:
                _kill(nodes["site-c"])
            if event["event"] == "round_started" and event["round"] == 2:
                _kill(nodes["site-b"])
        # After its last event the ServerApp logs to MLflow and ends its runs: let it.
        wait_for_run(flwr_home=setup.workspace.layout.flwr_home, run_id=run_id, timeout_s=180)

    assert _mlflow_statuses(setup) == {"KILLED"}  # run_stopped: ended early, cleanly
    done = [e for e in seen if e["event"] == "round_done"]
    assert [(e["round"], e["sites_answered"]) for e in done] == [(1, 2)]
    missing = {
        (e["site"], e["round"]) for e in seen if e["event"] in ("site_timeout", "site_declined")
    }
    assert ("site-c", 1) in missing and ("site-b", 2) in missing
    last = seen[-1]
    assert last["event"] == "run_stopped"
    assert "min_sites" in last["reason"]
    assert last["summary"]["rounds_completed"] == 1
    for site in ("site-a", "site-b", "site-c"):
        _ledger(setup, site).verify()  # a killed site's ledger is still whole


def test_aggregator_restart_resumes_without_gap_or_double_spend(tmp_path: Path) -> None:
    setup = _setup(tmp_path, sites=2, rounds=3)
    with ProcessGroup() as group:
        aggregator = group.add(start_aggregator(workspace=setup.workspace).process)
        start_site_nodes(group=group, setup=setup)
        run_id = submit(workspace=setup.workspace, settings=setup.settings)
        for event in _events(setup, run_id):
            if event["event"] == "round_done" and event["round"] == 1:
                _kill(aggregator)  # the SuperLink and its ServerApp die mid-run
                break

        group.add(start_aggregator(workspace=setup.workspace).process)
        wait_for_nodes(flwr_home=setup.workspace.layout.flwr_home, count=2, timeout_s=120)
        resumed = setup.settings.model_copy(update={"resume": True})
        run_id = submit(workspace=setup.workspace, settings=resumed)
        events = list(_events(setup, run_id))
        wait_for_run(flwr_home=setup.workspace.layout.flwr_home, run_id=run_id, timeout_s=180)

    # The resumed ServerApp reopened the MLflow runs of the first attempt (no new ones).
    assert _mlflow_statuses(setup, runs=3) == {"FINISHED"}
    assert events[0]["event"] == "run_started" and events[0]["resume_from"] == 1
    assert events[-1]["event"] == "run_finished", events[-1]
    assert [e["round"] for e in events if e["event"] == "round_done"] == [2, 3]
    for site in setup.site_configs:
        report = _ledger(setup, site).verify()
        assert [r.round for r in report.reservations] == [1, 2, 3]
        assert all(r.committed for r in report.reservations)
        copy = setup.workspace.root / "ledgers" / f"{site}.ledger.jsonl"
        assert copy.read_bytes() == report.path.read_bytes()
