"""A run's results as tables, from the events file the aggregator writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from event_support import write_event

import medfed
from medfed.errors import ConfigError
from medfed.tracking.info import TrackingInfo, write_tracking_info
from medfed.workspace import RunPaths, run_paths

SITES = ["site-a", "site-b"]


def _site_update(site: str, round_index: int, dice_before: float, epsilon: float) -> dict[str, Any]:
    return {
        "site": site,
        "round": round_index,
        "patients": 6 if site == "site-a" else 9,
        "loss": 1.0 / round_index,
        "dice_before": dice_before,
        "releases": {
            "loss": {"mechanism": "dp-sgd", "noise_std": 0.25, "seq": 3},
            "dice_before": {"mechanism": "gaussian", "noise_std": 0.125, "seq": 4},
        },
        "epsilon_spent": epsilon,
        "epsilon_cap": 8.0,
    }


def _record(workspace: Path, *, run_name: str = "study", resumed: bool = False) -> Path:
    """The events of a two-site, two-round run, written as the round loop writes them."""
    paths = run_paths(workspace, run_name)

    def emit(kind: str, **fields: Any) -> None:
        write_event(paths.events, kind, **fields)

    emit("run_started", run_name=run_name, resume_from=None, rounds=2, sites=SITES, settings={})
    emit("sites_online", run_name=run_name, online=SITES, missing=[])
    emit("round_started", run_name=run_name, round=1, sites=SITES)
    emit("site_update", run_name=run_name, **_site_update("site-a", 1, 0.10, 3.0))
    emit("site_update", run_name=run_name, **_site_update("site-b", 1, 0.20, 2.5))
    emit(
        "round_done",
        run_name=run_name,
        round=1,
        sites_answered=2,
        sites_asked=2,
        dice_before=0.16,
        loss=1.0,
        seconds=2.5,
        bytes_sent=100,
        bytes_received=120,
        epsilon={"site-a": 3.0, "site-b": 2.5},
    )
    emit("round_started", run_name=run_name, round=2, sites=SITES)
    if resumed:
        # the aggregator stopped in round 2 and the run was resumed: round 2 is trained again
        emit("site_update", run_name=run_name, **_site_update("site-a", 2, 0.11, 99.0))
        emit("run_started", run_name=run_name, resume_from=1, rounds=2, sites=SITES, settings={})
    emit("site_update", run_name=run_name, **_site_update("site-a", 2, 0.30, 4.5))
    emit("site_update", run_name=run_name, **_site_update("site-b", 2, 0.40, 3.9))
    emit(
        "round_done",
        run_name=run_name,
        round=2,
        sites_answered=2,
        sites_asked=2,
        dice_before=0.36,
        loss=0.5,
        seconds=2.0,
        bytes_sent=200,
        bytes_received=240,
        epsilon={"site-a": 4.5, "site-b": 3.9},
    )
    emit(
        "evaluation",
        run_name=run_name,
        round=2,
        dice=0.55,
        sites={"site-a": 0.5, "site-b": None},
        releases={"site-a": {"mechanism": "public", "noise_std": None, "seq": 9}},
    )
    sites = [
        {
            "site_id": site,
            "status": "active",
            "rounds": 2,
            "patients": patients,
            "dice": dice,
            "loss": 0.5,
            "reason": "",
            "epsilon_spent": spent,
            "epsilon_cap": 8.0,
            "delta": 1e-5,
        }
        for site, patients, dice, spent in (("site-a", 6, 0.5, 4.5), ("site-b", 9, None, 3.9))
    ]
    summary = {
        "run_name": run_name,
        "status": "finished",
        "reason": "all rounds done",
        "rounds_completed": 2,
        "dice_initial": 0.16,
        "dice_final": 0.55,
        "model": str(paths.global_model(2)),
        "sites": sites,
        "budgets": {},
    }
    emit(
        "run_finished",
        run_name=run_name,
        status="finished",
        reason="all rounds done",
        summary=summary,
    )
    return paths.directory


def test_history_has_one_row_per_site_and_round_with_the_global_dice(tmp_path: Path) -> None:
    run_dir = _record(tmp_path)
    write_tracking_info(
        paths=RunPaths(directory=run_dir),
        info=TrackingInfo(
            tracking_uri="sqlite:////tmp/x/mlflow.db", experiment_id="1", parent_run_id="abc123"
        ),
    )
    results = medfed.load_results(workspace=tmp_path, run_name="study")

    history = results.history
    assert list(history.columns) == [
        "round", "site", "loss", "dice", "epsilon",
        "dice_before", "epsilon_cap", "patients", "loss_release", "dice_release",
    ]  # fmt: skip
    assert list(zip(history["round"], history["site"], strict=True)) == [
        (1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b"),
    ]  # fmt: skip
    # the global model after round 1 is what round 2 starts from; after round 2, the final one
    assert history["dice"].tolist()[:3] == [0.30, 0.40, 0.5]
    assert math.isnan(history["dice"].tolist()[3])  # site-b's final evaluation gave no number
    assert history["epsilon"].tolist() == [3.0, 2.5, 4.5, 3.9]
    assert history["patients"].tolist() == [6, 9, 6, 9]
    # Each number says which mechanism released it.
    assert history["loss_release"].tolist() == ["dp-sgd (std 0.25)"] * 4
    assert history["dice_release"].tolist() == [
        "gaussian (std 0.125)", "gaussian (std 0.125)", "public", "",
    ]  # fmt: skip
    assert results.dice_table().loc[1, "site-b"] == 0.40
    assert results.epsilon_table().loc[2, "site-a"] == 4.5

    assert results.rounds["round"].tolist() == [1, 2]
    assert results.rounds["dice_before"].tolist() == [0.16, 0.36]
    assert results.sites["site"].tolist() == SITES
    assert results.sites["epsilon_spent"].tolist() == [4.5, 3.9]
    assert math.isnan(results.sites["dice"].tolist()[1])
    assert (results.status, results.reason) == ("finished", "all rounds done")
    assert (results.initial_dice, results.final_dice) == (0.16, 0.55)
    assert results.site_dice["site-a"] == 0.5
    assert results.mlflow_run_id == "abc123"
    assert results.tracking_uri == "sqlite:////tmp/x/mlflow.db"
    assert results.model == run_dir / "global" / "round-0002"
    assert results.run_directory == run_dir


def test_a_resumed_round_counts_with_its_last_attempt(tmp_path: Path) -> None:
    _record(tmp_path, resumed=True)
    results = medfed.load_results(workspace=tmp_path, run_name="study")
    rows = results.history[results.history["round"] == 2]
    assert rows["epsilon"].tolist() == [4.5, 3.9]
    assert results.mlflow_run_id is None


def test_a_run_without_a_last_event_is_still_running(tmp_path: Path) -> None:
    events = run_paths(tmp_path, "live").events
    write_event(events, "run_started", run_name="live", resume_from=None, rounds=3, sites=SITES)
    write_event(events, "site_update", run_name="live", **_site_update("site-a", 1, 0.1, 1.0))
    results = medfed.load_results(workspace=tmp_path, run_name="live")
    assert results.status == "running"
    assert len(results.history) == 1 and math.isnan(results.history["dice"][0])
    assert results.sites.empty and math.isnan(results.final_dice)


def test_an_unknown_run_names_the_runs_there_are(tmp_path: Path) -> None:
    _record(tmp_path, run_name="study")
    with pytest.raises(ConfigError, match="no events of run 'other'") as caught:
        medfed.load_results(workspace=tmp_path, run_name="other")
    assert caught.value.hint == "runs of this workspace: study"
