"""Federation events to MLflow, read back from a real SQLite store with an explicit client."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from tracking_support import CAPS, ROUNDS, SITES, FakeRun

from medfed.run_events import RoundDone
from medfed.tracking import default_tracking_uri, prepare_store
from medfed.tracking.info import read_tracking_info
from medfed.tracking.operations import MAX_PARAM_LENGTH, MAX_PARAMS_PER_BATCH
from medfed.tracking.tracker import FederationTracker
from medfed.workspace import RunPaths

pytestmark = pytest.mark.slow


def _track(run: FakeRun, *, last: str = "run_finished", close: bool = True) -> FederationTracker:
    uri = default_tracking_uri(workspace_root=run.workspace)
    prepare_store(uri=uri)
    tracker = FederationTracker(tracking_uri=uri, run_dir=run.run_dir, timeout_s=2.0)
    for event in run.events(last=last):
        tracker.on_event(event)
    if close:
        tracker.close()
    return tracker


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _children(client: MlflowClient, parent: Run) -> dict[str, Run]:
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    return {run.data.tags["medfed.site_id"]: run for run in found}


def test_a_run_becomes_a_parent_run_with_one_child_per_site(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    tracker = _track(run)
    assert tracker.pending == 0
    info = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert info is not None and info.tracking_uri == tracker.tracking_uri
    assert info.tracking_uri == f"sqlite:///{run.workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=info.tracking_uri)
    parent = client.get_run(info.parent_run_id)

    assert parent.info.run_name == "trial" and parent.info.status == "FINISHED"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "medfed"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "one child run per site" in experiment.tags["mlflow.note.content"]
    tags = parent.data.tags
    assert tags["medfed.run_name"] == "trial" and tags["medfed.sites"] == "site-a,site-b"
    assert tags["medfed.strategy"] == "fedavg" and tags["medfed.status"] == "finished"
    assert tags["medfed.secure_aggregation"] == "false"
    assert len(tags["medfed.app_hash"]) == 64
    # The run's description: what ran and what each site spent, written at its end.
    note = tags["mlflow.note.content"]
    assert note.startswith("Federated training run **trial**: 2 sites (site-a, site-b), ")
    assert "strategy fedavg, 2 of 2 rounds; finished." in note
    assert "Final Dice **0.420** (before training 0.100); epsilon spent (privacy unit: " in note
    assert "rounded up): site-a 1.800 of 8, site-b 2.600 of 6." in note
    assert "- site-a: epsilon 1.800 at delta 1e-05 (rdp accountant, cap 8)" in note
    assert "- site-b: epsilon 2.600 at delta 1e-05 (rdp accountant, cap 6)" in note
    for name in ("version", "flwr", "torch", "opacus", "mlflow"):
        assert tags[f"medfed.{name}"] not in ("", "not installed")
    params = parent.data.params
    assert params["strategy.name"] == "fedavg" and params["rounds"] == "2"
    assert params["seed"] == "3" and json.loads(params["sites"]) == list(SITES)
    assert params["model.channels"] == "[8, 16, 32]" and params["learning_rate"] == "null"

    # Parent metrics, one value per round at step=round.
    assert _history(client, parent.info.run_id, "epsilon_max") == {
        r: max(run.epsilon(s, r) for s in SITES) for r in (1, 2)
    }
    assert _history(client, parent.info.run_id, "bytes_moved") == {1: 1500.0, 2: 3000.0}
    assert _history(client, parent.info.run_id, "dice_global") == {1: 0.1, 2: 0.2}
    assert _history(client, parent.info.run_id, "round_seconds") == {1: 3.0, 2: 4.0}
    assert _history(client, parent.info.run_id, "sites_answered") == {1: 2.0, 2: 2.0}
    assert _history(client, parent.info.run_id, "dice_final") == {ROUNDS: 0.42}

    children = _children(client, parent)
    assert sorted(children) == list(SITES) == sorted(info.site_runs)
    for site, child in children.items():
        assert child.info.run_id == info.site_runs[site]
        assert child.info.run_name == f"trial/{site}" and child.info.status == "FINISHED"
        run_id = child.info.run_id
        spent = {r: run.epsilon(site, r) for r in (1, 2)}
        assert _history(client, run_id, "epsilon_spent") == spent
        assert _history(client, run_id, "epsilon_remaining") == pytest.approx(
            {r: CAPS[site] - e for r, e in spent.items()}
        )
        assert set(_history(client, run_id, "train_loss")) == {1, 2}
        assert set(_history(client, run_id, "dice_before")) == {1, 2}
        # Each released number names its mechanism beside it.
        assert child.data.tags["medfed.release.train_loss"] == "dp-sgd (std 0.25)"
        assert child.data.tags["medfed.release.patients"] == "public"
    assert children["site-a"].data.tags["medfed.release.dice_before"] == "gaussian (std 0.2)"
    assert "medfed.release.dice_before" not in children["site-b"].data.tags
    assert _history(client, children["site-a"].info.run_id, "dice_final") == {ROUNDS: 0.42}
    issue = children["site-b"].data.tags["medfed.last_issue"]
    assert issue.startswith("site_timeout") and "evaluate" in issue

    # Artifacts: the ledgers byte for byte, the budget state, the summary and two plots.
    listed = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ledgers", "plots", "budget_state.json", "summary.json"} <= listed
    out = Path(client.download_artifacts(parent.info.run_id, "", str(run.workspace / "dl")))
    for site in SITES:
        ledger = run.workspace / "ledgers" / f"{site}.ledger.jsonl"
        assert (out / "ledgers" / ledger.name).read_bytes() == ledger.read_bytes()
    assert json.loads((out / "budget_state.json").read_text()) == run.summary()["budgets"]
    for plot in ("dice.png", "epsilon.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Artifacts live beside the database, not in the current directory.
    assert (run.workspace / "mlartifacts").is_dir()
    assert not (run.run_dir / "mlflow-staging").exists()

    # The final model: logged with mlflow.pytorch and registered with its guarantee.
    version = client.get_model_version("medfed-trial", "1")
    assert version.run_id == parent.info.run_id
    assert version.tags["medfed.privacy_unit"] == "patient"
    assert version.tags["medfed.accountant"] == "rdp"
    assert version.tags["medfed.sites"] == "site-a,site-b"
    assert version.tags["medfed.rounds"] == str(ROUNDS)
    assert version.tags["medfed.run_name"] == "trial"
    lines = version.description.splitlines()
    assert lines[2:4] == [
        "- site-a: epsilon 1.800 at delta 1e-05 (rdp accountant, cap 8)",
        "- site-b: epsilon 2.600 at delta 1e-05 (rdp accountant, cap 6)",
    ]
    for site in SITES:
        assert float(version.tags[f"medfed.epsilon.{site}"]) == run.epsilon(site, ROUNDS)
        assert float(version.tags[f"medfed.delta.{site}"]) == 1e-5
    assert (
        client.get_run(parent.info.run_id)
        .data.tags["medfed.model_format"]
        .startswith("mlflow.pytorch")
    )
    import mlflow.pytorch
    import numpy as np
    import torch

    assert version.source.startswith("models:/")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == parent.info.run_id
    loaded = mlflow.pytorch.load_model(logged.artifact_location)  # a local path: no global URI
    with torch.no_grad():
        output = loaded(torch.zeros((3, 1, 32, 32)))  # another batch size than the example's
    assert tuple(output.shape) == (3, 2, 32, 32) and np.isfinite(output.numpy()).all()
    assert mlflow.active_run() is None


def test_a_failed_run_ends_failed_and_a_stopped_one_killed(
    fake_run: Callable[..., FakeRun],
) -> None:
    failed, stopped = fake_run("failed"), fake_run("stopped")
    _track(failed, last="run_failed")
    _track(stopped, last="run_stopped")
    for run, status in ((failed, "FAILED"), (stopped, "KILLED")):
        info = read_tracking_info(paths=RunPaths(directory=run.run_dir))
        assert info is not None
        client = MlflowClient(tracking_uri=info.tracking_uri)
        parent = client.get_run(info.parent_run_id)
        assert parent.info.status == status
        assert {c.info.status for c in _children(client, parent).values()} == {status}
    info = read_tracking_info(paths=RunPaths(directory=failed.run_dir))
    assert info is not None
    client = MlflowClient(tracking_uri=info.tracking_uri)
    tags = client.get_run(info.parent_run_id).data.tags
    assert tags["medfed.reason"] == "something broke"
    assert tags["mlflow.note.content"] == (
        "Federated training run **failed**: 2 sites (site-a, site-b), strategy fedavg, "
        "2 rounds planned; failed: something broke."
    )
    # No summary: ledgers and plots still, no model.
    listed = {a.path for a in client.list_artifacts(info.parent_run_id)}
    assert "ledgers" in listed and "summary.json" not in listed
    assert client.search_model_versions("name = 'medfed-failed'") == []


def test_closing_without_a_last_event_ends_every_run_failed(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    uri = default_tracking_uri(workspace_root=run.workspace)
    tracker = FederationTracker(tracking_uri=uri, run_dir=run.run_dir)
    for event in run.events():
        if event.kind == "evaluation":
            break
        tracker.on_event(event)
    tracker.close()
    tracker.close()  # twice is harmless
    tracker.on_event(RoundDone(run_name="trial", round=9))  # after close: ignored
    info = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert info is not None
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([info.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    assert "without a last event" in client.get_run(info.parent_run_id).data.tags["medfed.reason"]


def test_a_resumed_run_reopens_its_runs_and_continues_their_metrics(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    uri = default_tracking_uri(workspace_root=run.workspace)
    first = FederationTracker(tracking_uri=uri, run_dir=run.run_dir)
    for event in run.events():
        first.on_event(event)
        if event.kind == "round_done":
            break  # the aggregator dies after round 1 ...
    first.close()
    before = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert before is not None

    second = FederationTracker(tracking_uri=uri, run_dir=run.run_dir)
    for event in run.events():
        if event.kind == "run_started":
            event = dataclasses.replace(event, resume_from=1)
        elif getattr(event, "round", None) == 1:
            continue  # ... and the resumed run starts at round 2
        second.on_event(event)
    second.close()

    after = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert after == before
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(after.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["medfed.resumed_from"] == "1"
    assert set(_history(client, parent.info.run_id, "epsilon_max")) == {1, 2}
    assert len(client.search_runs([after.experiment_id])) == 3
    for site, run_id in after.site_runs.items():
        assert client.get_run(run_id).info.status == "FINISHED"
        assert set(_history(client, run_id, "epsilon_spent")) == {1, 2}, site


def test_limits_match_mlflow() -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    assert MAX_PARAM_LENGTH == MAX_PARAM_VAL_LENGTH
    assert MAX_PARAMS_PER_BATCH == MAX_PARAMS_TAGS_PER_BATCH


def test_a_privacy_alert_is_a_tag_on_the_run_and_the_sites_child(
    fake_run: Callable[..., FakeRun],
) -> None:
    run = fake_run()
    uri = default_tracking_uri(workspace_root=run.workspace)
    prepare_store(uri=uri)
    tracker = FederationTracker(tracking_uri=uri, run_dir=run.run_dir)
    alert = "site site-b raised its cap: terms changed at seq 6: cap 6 ... -> cap 9 ..."
    for event in run.events():
        tracker.on_event(event)
        if event.kind == "round_started":
            tracker.on_event(run.emit("privacy_alert", site="site-b", round=1, alert=alert))
    tracker.close()
    info = read_tracking_info(paths=RunPaths(directory=run.run_dir))
    assert info is not None
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(info.parent_run_id)
    assert parent.data.tags["medfed.privacy_alert"] == alert
    children = _children(client, parent)
    assert children["site-b"].data.tags["medfed.privacy_alert"] == alert
    assert "medfed.privacy_alert" not in children["site-a"].data.tags
