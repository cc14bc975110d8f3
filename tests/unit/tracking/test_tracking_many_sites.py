"""A federation of a thousand sites stays within MLflow's limits on tags and params."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medfed.audit.mlflow_store import version_sites
from medfed.config.run import RunSettings
from medfed.run_events import RunStarted
from medfed.tracking import default_tracking_uri, model_log, prepare_store
from medfed.tracking.info import read_tracking_info
from medfed.tracking.operations import (
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    SETTINGS_ARTIFACT,
    SITES_ARTIFACT,
    Translator,
    sites_tags,
)
from medfed.tracking.plots import MAX_SITE_LINES, RunSeries, write_plots
from medfed.transport.simulation_tracking import simulation_tracking
from medfed.workspace import RunPaths

SITES = tuple(f"hospital-site-{index:05d}" for index in range(1000))


def _started() -> RunStarted:
    settings = RunSettings(run_name="wide", rounds=1, sites=list(SITES))
    return RunStarted(
        run_name="wide", rounds=1, sites=SITES, settings=settings.model_dump(mode="json")
    )


def test_mlflow_limits_are_the_ones_medfed_keeps_to() -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

    assert (MAX_PARAM_LENGTH, MAX_TAG_LENGTH) == (MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH)


def test_every_tag_and_param_of_a_thousand_site_run_fits() -> None:
    ops = Translator().operations(_started())

    tags = {k: v for op in ops for k, v in (op.get("tags") or {}).items()} | {
        k: v for op in ops if op["op"] == "batch" for k, v in op["tags"]
    }
    params = {k: v for op in ops if op["op"] == "batch" for k, v in op["params"]}
    assert max(len(v) for v in tags.values()) <= MAX_TAG_LENGTH
    assert max(len(v) for v in params.values()) <= MAX_PARAM_LENGTH
    assert len(",".join(SITES)) > MAX_TAG_LENGTH  # the list itself would not fit
    assert tags["medfed.site_count"] == "1000"
    digest = hashlib.sha256(json.dumps(list(SITES)).encode("utf-8")).hexdigest()
    assert (
        tags["medfed.sites"] == f"1000 sites (sha256 {digest}; the list: artifact {SITES_ARTIFACT})"
    )
    # A param cut short says so, with the whole value's length and digest.
    assert params["sites"].endswith(f"the whole value: {SETTINGS_ARTIFACT})")
    assert "(cut: " in params["sites"]
    artifacts = {op["file"]: op["data"] for op in ops if op["op"] == "json"}
    assert artifacts[SITES_ARTIFACT] == list(SITES)
    assert artifacts[SETTINGS_ARTIFACT]["sites"] == list(SITES)


def test_a_short_site_list_is_named_in_the_tag() -> None:
    tags = sites_tags(["site-a", "site-b"])
    assert tags["medfed.sites"] == "site-a,site-b" and tags["medfed.site_count"] == "2"


def test_a_thousand_site_simulation_run_in_a_real_store(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path)
    prepare_store(uri=uri)
    run_dir = tmp_path / "runs" / "wide"
    with simulation_tracking(
        tracking_uri=uri, run_dir=run_dir, sites=len(SITES), child_runs=2
    ) as tracked:
        tracked.on_event(_started())
    info = read_tracking_info(paths=RunPaths(directory=run_dir))
    assert info is not None
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(info.parent_run_id)

    assert parent.info.status == "FAILED"  # closed without a last event: every run ended
    tags = parent.data.tags
    assert tags["medfed.site_count"] == "1000" and tags["medfed.sites"].startswith("1000 sites")
    assert tags["medfed.simulation.child_runs"] == "2"
    # Child runs for the first two sites only; the parent's description counts them all.
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{info.parent_run_id}'",
    )
    assert sorted(run.data.tags["medfed.site_id"] for run in children) == list(SITES[:2])
    assert "1000 sites (hospital-site-00000, " in tags["mlflow.note.content"]
    assert parent.data.params["sites"].endswith(f"{SETTINGS_ARTIFACT})")
    local = Path(client.download_artifacts(info.parent_run_id, SITES_ARTIFACT, str(tmp_path)))
    listed = json.loads(local.read_text(encoding="utf-8"))
    assert listed == list(SITES)
    digest = hashlib.sha256(json.dumps(listed).encode("utf-8")).hexdigest()
    assert tags["medfed.sites_sha256"] == digest


def test_model_version_tags_name_every_site(monkeypatch: pytest.MonkeyPatch) -> None:
    summary = {
        "rounds_completed": 1,
        "sites": [{"site_id": site} for site in SITES],
        "budgets": {
            "sites": {
                site: {"epsilon_spent": 1.0, "delta": 1e-5, "accountant": "rdp", "epsilon_cap": 8.0}
                for site in SITES
            }
        },
    }
    tags = model_log.privacy_tags(summary=summary, run_name="wide")
    assert tags["medfed.sites"] == ",".join(SITES) and len(tags["medfed.sites"]) < 100_000
    assert version_sites(tags) == SITES
    # Past the registry's limit the tag is a count, and the auditor still finds every site.
    monkeypatch.setattr(model_log, "MAX_VERSION_SITES_LENGTH", 100)
    tags = model_log.privacy_tags(summary=summary, run_name="wide")
    assert tags["medfed.sites"].startswith("1000 sites (sha256 ")
    assert version_sites(tags) == SITES


def test_plots_of_a_thousand_sites_draw_their_spread(tmp_path: Path) -> None:
    series = RunSeries(
        dice_sites={site: {1: 0.5, 2: 0.6 + index / 10_000} for index, site in enumerate(SITES)},
        dice_global={1: 0.5, 2: 0.65},
        epsilon_sites={site: {1: 0.5, 2: 1.0} for site in SITES},
        caps=dict.fromkeys(SITES, 8.0),
    )
    assert len(SITES) > MAX_SITE_LINES
    with warnings.catch_warnings():
        # A legend of a thousand names does not fit: matplotlib would warn that it cannot lay
        # the figure out.
        warnings.simplefilter("error")
        written = write_plots(series=series, directory=tmp_path, title="wide")
    assert [p.name for p in written] == ["dice.png", "epsilon.png"]
    assert all(p.stat().st_size < 200_000 for p in written)
