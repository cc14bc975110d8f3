"""A tracking server that is down or hangs neither stalls the federation nor loses the run."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from mlflow import MlflowClient
from tracking_support import ROUNDS, SITES, FakeRun

from medfed.tracking import default_tracking_uri
from medfed.tracking.info import read_tracking_info
from medfed.tracking.tracker import FederationTracker
from medfed.workspace import RunPaths

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _pending(run: FakeRun) -> list[dict[str, object]]:
    lines = RunPaths(directory=run.run_dir).mlflow_pending.read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def _feed(tracker: FederationTracker, run: FakeRun) -> list[float]:
    took = []
    for event in run.events():
        started = time.monotonic()
        tracker.on_event(event)  # never raises
        took.append(time.monotonic() - started)
    return took


def test_a_dead_server_costs_nothing_and_the_run_waits_on_disk(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    down = f"http://127.0.0.1:{_closed_port()}"
    tracker = FederationTracker(tracking_uri=down, run_dir=run.run_dir, timeout_s=1.0)
    took = _feed(tracker, run)
    started = time.monotonic()
    tracker.close()
    assert time.monotonic() - started < 3.0
    # One call may wait out the 1 s timeout (a loaded machine adds to it); the rest back off.
    assert max(took) < 2.5 and sum(took) < 5.0

    assert tracker.pending > 0
    assert read_tracking_info(paths=RunPaths(directory=run.run_dir)) is None  # no run exists yet
    ops = _pending(run)
    assert [op["op"] for op in ops if op["op"] in ("create", "model")] == ["create"] * 3 + ["model"]
    spent = [
        (metric[0], metric[3])
        for op in ops
        if op["op"] == "batch"
        for metric in op["metrics"]  # type: ignore[attr-defined]
        if metric[0] == "epsilon_spent"
    ]
    expected = [("epsilon_spent", r) for r in range(1, ROUNDS + 1) for _ in SITES]
    assert sorted(spent) == sorted(expected)
    assert [op["status"] for op in ops if op["op"] == "terminate"] == ["FINISHED"] * 3

    # Once a store answers, the next tracker of this run directory sends everything.
    uri = default_tracking_uri(workspace_root=run.workspace)
    later = FederationTracker(tracking_uri=uri, run_dir=run.run_dir)
    later.close()
    assert later.pending == 0 and not RunPaths(directory=run.run_dir).mlflow_pending.exists()
    info = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert info is not None and info.tracking_uri == uri
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(info.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert len(client.get_metric_history(info.parent_run_id, "epsilon_max")) == ROUNDS
    for site in SITES:
        history = client.get_metric_history(info.site_runs[site], "epsilon_spent")
        assert {m.step: m.value for m in history} == {
            r: run.epsilon(site, r) for r in range(1, ROUNDS + 1)
        }
    assert {a.path for a in client.list_artifacts(info.parent_run_id)} >= {"ledgers", "plots"}
    assert client.get_model_version("medfed-trial", "1").tags["medfed.rounds"] == str(ROUNDS)


def test_a_hung_server_costs_one_short_timeout_then_waits(
    fake_run: Callable[..., FakeRun], silent_server: str
) -> None:
    run = fake_run()
    tracker = FederationTracker(
        tracking_uri=silent_server,
        run_dir=run.run_dir,
        timeout_s=1.0,
    )
    took = _feed(tracker, run)
    started = time.monotonic()
    tracker.close()
    closing = time.monotonic() - started
    # One call times out (1 s); the back-off keeps the next events from waiting again, and
    # the last event and close() try once more each.
    assert sum(took) < 6.0, took
    assert sorted(took)[-4] < 0.5, took
    assert closing < 3.0
    assert tracker.pending > 0 and RunPaths(directory=run.run_dir).mlflow_pending.is_file()
    assert any(op["op"] == "terminate" for op in _pending(run))
