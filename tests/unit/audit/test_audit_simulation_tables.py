"""A simulation's sites without a child run are checked against its per-round site tables.

The store is written as :mod:`medfed.transport.simulation_tracking` writes it: a parent run,
a child run for the first sites only, and ``site_metrics/round-NNNN.csv`` on the parent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from audit_support import Federation

from medfed.audit import verify_workspace
from medfed.audit.mlflow_store import ROUND_TABLE, SITE_COLUMN, SITE_TABLES
from medfed.transport.simulation_tracking import ARTIFACT_DIR, COLUMNS, round_table

mlflow = pytest.importorskip("mlflow")


def _simulated(federation: Federation, *, shift: float = 0.0) -> None:
    """site-a with a child run; site-b only in the round tables (its value + ``shift``)."""
    from mlflow import MlflowClient

    run_dir = federation.workspace_dir / "runs" / "run-1"
    uri = f"sqlite:///{federation.workspace_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "medfed", artifact_location=(federation.workspace_dir / "mlartifacts").as_uri()
    )
    parent = client.create_run(experiment, run_name="run-1").info.run_id
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    updates = [e for e in events if e.get("event") == "site_update"]
    child = client.create_run(
        experiment,
        run_name="run-1/site-a",
        tags={"mlflow.parentRunId": parent, "medfed.site_id": "site-a"},
    ).info.run_id
    for event in updates:
        if event["site"] == "site-a":
            client.log_metric(child, "epsilon_spent", event["epsilon_spent"], step=event["round"])
    for round_ in sorted({e["round"] for e in updates}):
        table = round_table(run_dir, round_)
        table.parent.mkdir(parents=True, exist_ok=True)
        with table.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            for event in updates:
                if event["round"] == round_:
                    row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
                    row.update(site=event["site"], status="updated")
                    row["epsilon_spent"] = repr(event["epsilon_spent"] + shift)
                    writer.writerow(row)
        client.log_artifact(parent, str(table), ARTIFACT_DIR)
    client.set_terminated(child)
    client.set_terminated(parent)
    info = {"tracking_uri": uri, "parent_run_id": parent, "site_runs": {"site-a": child}}
    (run_dir / "mlflow.json").write_text(json.dumps(info))


def test_the_tables_are_where_the_simulation_writes_them() -> None:
    assert SITE_TABLES == ARTIFACT_DIR and SITE_COLUMN in COLUMNS and "epsilon_spent" in COLUMNS
    assert ROUND_TABLE.fullmatch(round_table(Path("run"), 12).name)


def test_a_site_without_a_child_run_is_checked_against_its_table_row(
    federation: Federation,
) -> None:
    _simulated(federation)

    result = verify_workspace(workspace=federation.workspace_dir)

    assert result.passed, [f.one_line() for f in result.findings]
    checks = {c.site_id: c.detail for c in result.checks if "MLflow" in c.name}
    assert checks["site-b"].endswith("(the simulation's site table)")
    assert not checks["site-a"].endswith("(the simulation's site table)")


def test_a_wrong_table_value_is_a_finding(federation: Federation) -> None:
    _simulated(federation, shift=0.5)

    result = verify_workspace(workspace=federation.workspace_dir)

    [finding] = result.findings
    assert finding.site_id == "site-b" and finding.check == "mlflow"
    assert "site_metrics tables" in (finding.source or "")
    assert "last epsilon_spent (step 2)" in finding.problem
