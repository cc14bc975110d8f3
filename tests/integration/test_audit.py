"""`medfed audit` on the record of a real federation: it passes, reports, and catches tampering.

A real in-process federation (two sites, real Opacus DP-SGD, real signed ledgers), then the
auditor's commands as a user runs them, in fresh processes.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from medfed.api.demo import DemoSetup, prepare_federation
from medfed.audit.findings import fmt
from medfed.config import load_site_config
from medfed.transport.inprocess import run_in_process

pytestmark = pytest.mark.slow

RunMedfed = Callable[..., CompletedProcess[str]]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> DemoSetup:
    setup = prepare_federation(
        root=tmp_path_factory.mktemp("audit") / "fed",
        sites=2,
        cases=16,
        size=32,
        rounds=2,
        local_epochs=1,
    )
    # Tracked to MLflow (as the deployed ServerApp does) where MLflow is installed, so that the
    # audit reads what medfed's tracker wrote; without MLflow the MLflow check is skipped.
    tracking_uri = None
    if importlib.util.find_spec("mlflow") is not None:
        from medfed.tracking import default_tracking_uri

        tracking_uri = default_tracking_uri(workspace_root=setup.workspace.root)
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings,
        tracking_uri=tracking_uri,
    )
    assert result.status == "finished", result.reason
    return setup


def _summary(setup: DemoSetup) -> dict[str, dict[str, float]]:
    path = setup.workspace.root / "runs" / setup.settings.run_name / "summary.json"
    rows = json.loads(path.read_text())["sites"]
    return {row["site_id"]: row for row in rows}


def test_audit_of_a_real_federation(
    federation: DemoSetup, run_medfed: RunMedfed, tmp_path: Path
) -> None:
    ws = str(federation.workspace.root)
    ledgers = [
        f"--ledger={site}={load_site_config(path).ledger_path}"
        for site, path in sorted(federation.site_configs.items())
    ]

    verified = run_medfed("audit", "verify", "--workspace", ws, "--json", *ledgers, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    result = json.loads(verified.stdout)
    assert result["verdict"] == "PASS" and result["runs"] == ["demo"]
    statuses = {(c["site_id"], c["name"]): c["status"] for c in result["checks"]}
    for site in ("site-a", "site-b"):
        for name in ("ledger copy", "site ledger", "site ledger vs copy", "two libraries", "cap"):
            assert statuses[(site, name)] == "pass", (site, name)
        assert statuses[(site, "run demo: summary epsilon")] == "pass"
    tracked = (federation.workspace.root / "runs" / "demo" / "mlflow.json").is_file()
    mlflow_checks = {site: s for (site, n), s in statuses.items() if "MLflow" in n}
    if tracked:
        assert mlflow_checks == {"site-a": "pass", "site-b": "pass"}
    else:
        assert mlflow_checks == {None: "skipped"}

    out = tmp_path / "report.json"
    made = run_medfed(
        "audit", "report", "--workspace", ws, "--out", str(out), "--format", "json", cwd=tmp_path
    )
    assert made.returncode == 0, made.stdout + made.stderr
    report = json.loads(out.read_text())
    summary = _summary(federation)
    assert set(report["sites"]) == set(summary) == {"site-a", "site-b"}
    for site, statement in report["sites"].items():
        assert statement["epsilon_spent"] == pytest.approx(summary[site]["epsilon_spent"], rel=1e-9)
        assert statement["epsilon"]["dp_accounting_rdp"] == pytest.approx(
            statement["epsilon_spent"], rel=1e-3
        )
        assert statement["epsilon"]["pld"] < statement["epsilon_spent"]
        assert statement["rounds_participated"] == 2
        assert statement["runs"] == {"demo": [1, 2]}
        assert statement["noise_multipliers"] == [federation.settings.noise_multiplier]
        assert statement["epsilon_cap"] == summary[site]["epsilon_cap"]
        assert len(statement["dice_vs_epsilon"]) == 2 and statement["models"]
        if tracked:
            assert statement["models_source"] == "MLflow model registry"
            assert [m["name"] for m in statement["models"]] == ["medfed-demo"]

    page = tmp_path / "report.html"
    made = run_medfed("audit", "report", "--workspace", ws, "--out", str(page), cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for site in ("site-a", "site-b"):
        assert f"Site {site}" in html

    pypdf = pytest.importorskip("pypdf")
    document = tmp_path / "report.pdf"
    made = run_medfed("audit", "report", "--workspace", ws, "--out", str(document), cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    assert made.stdout.startswith(f"pdf report written to {document}: 2 site(s)")
    text = " ".join(
        " ".join(page.extract_text().split()) for page in pypdf.PdfReader(document).pages
    )
    assert "Summary: what this means for each site's patients" in text
    for site, statement in report["sites"].items():
        assert f"Site {site}" in text
        assert f"{site}: For any one patient of {site}" in text
        assert fmt(statement["epsilon_spent"]) in text
        assert fmt(statement["epsilon"]["pld"]) in text
        assert "Models trained on this site's data" in text
    if tracked:
        assert "medfed-demo" in text


def test_tampering_with_the_aggregators_copy_is_named(
    federation: DemoSetup, run_medfed: RunMedfed, tmp_path: Path
) -> None:
    copy = federation.workspace.root / "ledgers" / "site-a.ledger.jsonl"
    original = copy.read_bytes()
    lines = original.split(b"\n")
    assert b'"noise_multiplier":' in lines[2]
    noise = f'"noise_multiplier":{federation.settings.noise_multiplier}'.encode()
    lines[2] = lines[2].replace(noise, b'"noise_multiplier":9.5')
    copy.write_bytes(b"\n".join(lines))
    try:
        verified = run_medfed(
            "audit", "verify", "--workspace", str(federation.workspace.root), cwd=tmp_path
        )
    finally:
        copy.write_bytes(original)

    assert verified.returncode == 10, verified.stdout + verified.stderr
    first = verified.stdout.splitlines()[0]
    assert first.startswith("FINDING [ledger-copy] site site-a: ledgers/site-a.ledger.jsonl: ")
    assert "line 3 (seq 2): bad signature" in first
    assert verified.stdout.strip().splitlines()[-1].startswith("FAIL: 1 finding(s)")
    assert "Traceback" not in verified.stderr
    assert verified.stderr.strip().startswith("error[audit]: 1 finding(s) for site(s) site-a")
