"""The MLflow side of an audit: each site's last logged epsilon, and the registered models.

A real SQLite tracking store, written here the way medfed's tracker writes it (a parent run,
one child per site with ``epsilon_spent`` at ``step=round``, and ``mlflow.json``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from audit_support import SITES, Federation

from medfed.audit import build_report, verify_workspace
from medfed.audit import mlflow_store as mlflow_module
from medfed.audit.mlflow_store import parse_sites

mlflow = pytest.importorskip("mlflow")


def _track(federation: Federation, *, shift: float = 0.0) -> dict[str, Any]:
    """Log run-1 to a fresh SQLite store as the tracker does; write mlflow.json."""
    from mlflow import MlflowClient

    run_dir = federation.workspace_dir / "runs" / "run-1"
    uri = f"sqlite:///{federation.workspace_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "medfed", artifact_location=(federation.workspace_dir / "mlartifacts").as_uri()
    )
    parent = client.create_run(experiment, run_name="run-1").info.run_id
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    site_runs = {}
    for site in SITES:
        child = client.create_run(
            experiment,
            run_name=f"run-1/{site}",
            tags={"mlflow.parentRunId": parent, "medfed.site_id": site},
        ).info.run_id
        site_runs[site] = child
        for event in events:
            if event.get("event") == "site_update" and event["site"] == site:
                client.log_metric(
                    child, "epsilon_spent", event["epsilon_spent"] + shift, step=event["round"]
                )
        client.set_terminated(child)
    client.set_terminated(parent)
    info = {
        "tracking_uri": uri,
        "experiment_id": experiment,
        "parent_run_id": parent,
        "site_runs": site_runs,
    }
    (run_dir / "mlflow.json").write_text(json.dumps(info))
    return info


def _mlflow_checks(result: Any) -> dict[tuple[str | None, str], str]:
    return {(c.site_id, c.status): c.detail for c in result.checks if "MLflow" in c.name}


def test_logged_epsilon_matches_the_ledger(federation: Federation) -> None:
    info = _track(federation)

    result = verify_workspace(workspace=federation.workspace_dir)
    assert result.passed, [f.one_line() for f in result.findings]
    checks = _mlflow_checks(result)
    assert set(checks) == {("site-a", "pass"), ("site-b", "pass")}
    [run] = result.site("site-a").runs
    assert run.mlflow_step == 2 and run.mlflow == pytest.approx(run.recomputed, rel=1e-12)

    # Without mlflow.json, the parent run id and URI find the children by their site tag.
    (federation.workspace_dir / "runs" / "run-1" / "mlflow.json").unlink()
    assert set(_mlflow_checks(verify_workspace(workspace=federation.workspace_dir))) == {
        (None, "skipped")
    }
    found = verify_workspace(
        workspace=federation.workspace_dir,
        run_name="run-1",
        tracking_uri=info["tracking_uri"],
        mlflow_run=info["parent_run_id"],
    )
    assert found.passed and set(_mlflow_checks(found)) == {("site-a", "pass"), ("site-b", "pass")}


def test_a_logged_epsilon_that_differs_is_a_finding(federation: Federation) -> None:
    _track(federation, shift=-0.01)

    result = verify_workspace(workspace=federation.workspace_dir)
    assert sorted((f.site_id, f.check) for f in result.findings) == [
        ("site-a", "mlflow"),
        ("site-b", "mlflow"),
    ]
    assert "last epsilon_spent (step 2)" in result.findings[0].problem


def test_mlflow_is_skipped_when_it_cannot_be_imported(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    _track(federation)
    monkeypatch.setattr(mlflow_module, "mlflow_missing", lambda: "mlflow is not installed")

    result = verify_workspace(workspace=federation.workspace_dir)
    assert result.passed
    assert _mlflow_checks(result) == {(None, "skipped"): "mlflow is not installed"}


def test_a_missing_store_is_skipped_and_never_created(federation: Federation) -> None:
    missing = federation.workspace_dir / "elsewhere.db"
    result = verify_workspace(
        workspace=federation.workspace_dir,
        run_name="run-1",
        tracking_uri=f"sqlite:///{missing}",
        mlflow_run="x",
    )
    assert result.passed and not missing.exists()
    assert "does not exist" in _mlflow_checks(result)[(None, "skipped")]


def test_registered_model_versions_name_the_sites_they_learnt_from(
    federation: Federation,
) -> None:
    from mlflow import MlflowClient

    info = _track(federation)
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    client.create_registered_model("medfed-run-1")
    for sites in ("site-a,site-b", "site-b"):
        client.create_model_version(
            "medfed-run-1",
            source=(federation.workspace_dir / "mlartifacts" / "model").as_uri(),
            run_id=info["parent_run_id"],
            tags={"medfed.sites": sites},
        )

    report = build_report(workspace=federation.workspace_dir)
    a, b = report.site("site-a"), report.site("site-b")
    assert a.models_source == b.models_source == "MLflow model registry"
    assert [m["version"] for m in a.models] == ["1"]
    assert [m["version"] for m in b.models] == ["1", "2"]
    assert "medfed-run-1" in report.to_html()


def test_sites_tag_forms() -> None:
    assert parse_sites("site-a, site-b") == ("site-a", "site-b")
    assert parse_sites('["site-a"]') == ("site-a",)
    assert parse_sites("") == ()
