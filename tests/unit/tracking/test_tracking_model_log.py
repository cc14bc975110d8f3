"""The final model's registration carries the privacy guarantee, with or without MONAI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tracking_support import ROUNDS, SITES, FakeRun

from medfed.tracking import default_tracking_uri
from medfed.tracking.model_log import example_patch, log_final_model, privacy_tags
from medfed.tracking.uri import open_store


def test_privacy_tags_state_each_sites_spend(fake_run: Callable[..., FakeRun]) -> None:
    run = fake_run()
    summary = run.summary()
    summary["sites"].append({"site_id": "site-z", "rounds": 0})  # never trained: no budget
    summary["budgets"]["sites"]["site-b"]["epsilon_spent"] = None  # an unbounded spend
    tags = privacy_tags(summary=summary, run_name="trial")
    assert tags["medfed.sites"] == "site-a,site-b"
    assert tags["medfed.epsilon.site-a"] == repr(run.epsilon("site-a", ROUNDS))
    assert tags["medfed.epsilon.site-b"] == "inf"
    assert tags["medfed.delta.site-a"] == "1e-05"
    assert tags["medfed.epsilon_cap.site-a"] == "8.0"
    assert tags["medfed.privacy_unit"] == "patient" and tags["medfed.accountant"] == "rdp"
    assert tags["medfed.accountant.site-a"] == "rdp"
    assert tags["medfed.rounds"] == str(ROUNDS) and tags["medfed.run_name"] == "trial"
    assert not any("site-z" in key for key in tags)
    assert tags["medfed.secure_aggregation"] == "unknown"
    summary["secure_aggregation"] = True
    assert privacy_tags(summary=summary, run_name="trial")["medfed.secure_aggregation"] == "true"
    assert tags["medfed.distributed_noise"] == "false"
    assert not any(key.startswith("medfed.epsilon_view") for key in tags)


def test_with_distributed_noise_both_epsilons_and_the_enforced_one_are_tagged(
    fake_run: Callable[..., FakeRun],
) -> None:
    summary = fake_run().summary()
    summary["distributed_noise"] = {"sites": 3, "count_share": 0.25}
    budget = summary["budgets"]["sites"]["site-a"]
    budget |= {"epsilon_distributed": 2.5, "epsilon_local": 7.25, "budget_view": "distributed"}
    tags = privacy_tags(summary=summary, run_name="trial")
    assert tags["medfed.distributed_noise"] == "3 sites"
    assert tags["medfed.epsilon_view.site-a"] == "distributed"
    assert tags["medfed.epsilon_distributed.site-a"] == "2.5"
    assert tags["medfed.epsilon_local.site-a"] == "7.25"
    assert "medfed.epsilon_view.site-b" not in tags


def test_the_example_patch_fits_the_network() -> None:
    assert example_patch(spatial_dims=3, downsampling=4) == (32, 32, 32)
    assert example_patch(spatial_dims=2, downsampling=3) == (33, 33)


@pytest.mark.slow
def test_without_monai_the_checkpoint_files_are_registered(
    fake_run: Callable[..., FakeRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.tracking import model_log

    monkeypatch.setattr(model_log, "_plain_network", lambda checkpoint: None)
    run = fake_run()
    uri = default_tracking_uri(workspace_root=run.workspace)
    client, experiment_id = open_store(uri=uri)
    run_id = client.create_run(experiment_id, run_name="trial").info.run_id
    try:
        version = log_final_model(
            client=client,
            tracking_uri=uri,
            experiment_id=experiment_id,
            run_id=run_id,
            checkpoint=run.checkpoint,
            summary=run.summary(),
            run_name="trial",
        )
        again = log_final_model(  # a retried operation registers no second version
            client=client,
            tracking_uri=uri,
            experiment_id=experiment_id,
            run_id=run_id,
            checkpoint=run.checkpoint,
            summary=run.summary(),
            run_name="trial",
            retry=True,
        )
    finally:
        client.set_terminated(run_id)
    assert version.model_format == "medfed-checkpoint" and again.version == version.version
    assert version.source == f"runs:/{run_id}/model"
    files = {a.path for a in client.list_artifacts(run_id, "model")}
    assert files == {"model/model.safetensors", "model/model.json"}
    assert "MONAI" in client.get_run(run_id).data.tags["medfed.model_format"]
    stored = client.get_model_version("medfed-trial", version.version)
    for site in SITES:
        assert float(stored.tags[f"medfed.epsilon.{site}"]) == run.epsilon(site, ROUNDS)
    assert len(client.search_model_versions("name = 'medfed-trial'")) == 1
    assert Path(run.checkpoint, "model.json").is_file()
