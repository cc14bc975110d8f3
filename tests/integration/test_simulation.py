"""`medfed simulate`: virtual sites on Flower's simulation engine (Ray), end to end.

The simulations run the real round loop and the real ClientApp over real synthetic data, with
DP-SGD, signed ledgers and MLflow; each runs in a fresh process (a small typer app with the
`simulate` command), as a user's `medfed simulate` would, so that Ray starts and stops there.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from medfed.config import load_site_config
from medfed.errors import ConfigError
from medfed.privacy.ledger import verify_ledger_bytes
from medfed.privacy.site_ledger import SiteLedger
from medfed.transport.simulation_client import site_context
from medfed.transport.simulation_memory import PeakMemory, tree_rss_mib
from medfed.transport.simulation_sites import SIMULATION_FILE, prepare_sites, site_id
from medfed.workspace import load_workspace

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="Ray is not installed (pip install 'medfed[simulation]')",
)

# `medfed simulate` as the CLI registers it, in a typer app of its own; MedfedError -> one line.
CLI = textwrap.dedent(
    """
    import sys, typer
    from medfed.cli.simulate_cmd import simulate
    from medfed.errors import MedfedError

    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("simulate")(simulate)
    app.command("version")(lambda: None)
    try:
        app()
    except MedfedError as exc:
        print(exc.one_line(), file=sys.stderr)
        sys.exit(exc.exit_code)
    """
)
# Hides Ray from the process, as on a machine without the `simulation` extra.
NO_RAY = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ray":
                raise ImportError("No module named 'ray'")
            return None

    sys.meta_path.insert(0, NoRay())
    """
)


def _simulate(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", prelude + CLI, "simulate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def _run_dir(root: Path) -> Path:
    (run,) = [p for p in (root / "workspace" / "runs").iterdir() if p.is_dir()]
    return run


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _mlflow(root: Path, run_dir: Path) -> dict[str, Any]:
    mlflow = pytest.importorskip("mlflow")
    info = json.loads((run_dir / "mlflow.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'workspace' / 'mlflow.db'}")
    parent = client.get_run(info["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    tables = [a.path for a in client.list_artifacts(parent.info.run_id, "site_metrics")]
    local = Path(client.download_artifacts(parent.info.run_id, "site_metrics", str(run_dir)))
    versions = client.search_model_versions(f"name='medfed-{run_dir.name}'")
    return {
        "parent": parent,
        "children": children,
        "tables": tables,
        "downloaded": local,
        "versions": versions,
    }


@needs_ray
@pytest.mark.slow
def test_twenty_virtual_sites_train_with_verified_ledgers_and_one_parent_run_then_again(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sim"
    report_file = tmp_path / "report.json"
    done = _simulate(
        *("--sites", "20", "--rounds", "2", "--child-runs", "3", "--cpus", "2"),
        *("--workspace", str(root), "--json", str(report_file)),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["sites"] == 20 and report["rounds"] == 2
    assert report["sites_verified"] == 20
    assert report["status"] == "finished" and report["rounds_completed"] == 2
    assert report["seconds_per_round"] > 0 and report["peak_rss_mib"] > 100
    assert "round 2: 20 of 20 sites" in done.stdout

    run_dir = _run_dir(root)
    assert (run_dir / "global" / "round-0002" / "model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    workspace = load_workspace(root / "workspace")
    tracked = summary["budgets"]["sites"]
    assert sorted(tracked) == [site_id(i) for i in range(20)]
    for index in range(20):
        site = site_id(index)
        config = load_site_config(root / "sites" / site / "site.yaml")
        # The site's own ledger and the aggregator's copy verify against the key registered in
        # the workspace, and the copy holds the site's entries of the run.
        key = workspace.ledger_public_key(site)
        own = config.ledger_path.read_bytes()
        copy = (root / "workspace" / "ledgers" / f"{site}.ledger.jsonl").read_bytes()
        assert own.startswith(copy)
        verify_ledger_bytes(copy, public_key=key, site_id=site, source="copy")
        spent = SiteLedger(
            path=config.ledger_path, key_path=config.signing_key_path, site_id=site
        ).spent(delta=1e-5, accountant="rdp")
        assert 0 < spent <= config.privacy.epsilon_cap
        assert tracked[site]["epsilon_spent"] == pytest.approx(spent, rel=1e-9)

    # Every site's metrics of each round in one table, beside the run and in MLflow.
    for round_index in (1, 2):
        rows = _table(run_dir / "site-metrics" / f"round-{round_index:04d}.csv")
        assert [row["site"] for row in rows] == [site_id(i) for i in range(20)]
        assert all(row["status"] == "updated" and float(row["epsilon_spent"]) > 0 for row in rows)
    logged = _mlflow(root, run_dir)
    parent = logged["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["medfed.simulation.sites"] == "20"
    assert parent.data.tags["medfed.simulation.child_runs"] == "3"
    assert parent.data.metrics["sites_epsilon_spent_max"] == pytest.approx(
        max(site["epsilon_spent"] for site in tracked.values()), rel=1e-9
    )
    assert sorted(logged["tables"]) == [
        "site_metrics/evaluation.csv",
        "site_metrics/round-0001.csv",
        "site_metrics/round-0002.csv",
    ]
    uploaded = _table(logged["downloaded"] / "round-0002.csv")
    assert len(uploaded) == 20 and uploaded == _table(run_dir / "site-metrics" / "round-0002.csv")
    assert sorted(r.data.tags["medfed.site_id"] for r in logged["children"]) == [
        site_id(i) for i in range(3)
    ]
    assert len(logged["versions"]) == 1
    # The run's audit report checks the sites without a child run against the tables.
    audit = json.loads((run_dir / "report" / "audit" / "audit_report.json").read_text())
    assert audit["verdict"] == "PASS", [f["text"] for f in audit["verification"]["findings"]]

    # A second run reuses the sites as they are (no new keys), and their budgets carry over.
    ca_key = (root / "workspace" / "ca" / "ca.key").read_bytes()
    again = _simulate(
        *("--sites", "2", "--cpus", "2", "--workspace", str(root), "--json", str(report_file)),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert (root / "workspace" / "ca" / "ca.key").read_bytes() == ca_key
    assert json.loads(report_file.read_text())["sites_verified"] == 2
    for index, grew in ((0, True), (1, True), (2, False)):
        config = load_site_config(root / "sites" / site_id(index) / "site.yaml")
        spent = SiteLedger(
            path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
        ).spent(delta=1e-5, accountant="rdp")
        assert (spent > tracked[site_id(index)]["epsilon_spent"]) is grew


def test_without_ray_the_command_says_what_to_install(tmp_path: Path) -> None:
    done = _simulate("--sites", "2", "--workspace", "sim", cwd=tmp_path, prelude=NO_RAY)

    assert done.returncode == 8, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "error[transport]" in done.stderr and "medfed[simulation]" in done.stderr
    assert not (tmp_path / "sim").exists()  # refused before anything was written


def test_each_virtual_node_gets_the_configuration_of_its_partition(tmp_path: Path) -> None:
    sites = prepare_sites(root=tmp_path / "sim", sites=3, cases=4, size=8)
    context = Context(
        run_id=1,
        node_id=99,
        node_config={"partition-id": 2, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )

    mapped = site_context(context, mapping_file=str(sites.mapping_file))

    config = load_site_config(Path(str(mapped.node_config["site-config"])))
    assert config.site_id == site_id(2) == "site-00003"
    assert mapped.node_config["partition-id"] == 2 and mapped.node_id == 99
    assert config.transport is not None
    kit = sites.workspace.root / sites.workspace.site(config.site_id).kit
    assert config.signing_key_path == kit / "ledger_key.pem"
    # The node key the engine registers for partition 2 is the one the aggregator knows it by.
    pem = sites.workspace.node_public_key_pem(site_id(2))
    assert sites.workspace.site_for_node_key(pem) == "site-00003"
    outside = Context(
        run_id=1, node_id=5, node_config={"partition-id": 3}, state=RecordDict(), run_config={}
    )
    with pytest.raises(ConfigError, match="partition 3"):
        site_context(outside, mapping_file=str(sites.mapping_file))


def test_sites_are_made_once_and_reused_only_for_the_same_data(tmp_path: Path) -> None:
    root = tmp_path / "sim"
    made = prepare_sites(root=root, sites=3, cases=4, size=8)
    record = (root / SIMULATION_FILE).read_text()
    assert made.train_patients == 3 and len(made.configs) == 3
    manifest = (root / "sites" / site_id(1) / "data" / "manifest.csv").read_bytes()

    fewer = prepare_sites(root=root, sites=2, cases=4, size=8)

    assert fewer.site_ids == (site_id(0), site_id(1))
    assert (root / SIMULATION_FILE).read_text() == record
    assert (root / "sites" / site_id(1) / "data" / "manifest.csv").read_bytes() == manifest
    with pytest.raises(ConfigError, match="fewer than --sites 4"):
        prepare_sites(root=root, sites=4, cases=4, size=8)
    with pytest.raises(ConfigError, match="4 cases of 8 pixels") as refused:
        prepare_sites(root=root, sites=2, cases=4, size=16)
    assert "--cases 4 --size 8" in (refused.value.hint or "")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no medfed simulation"):
        prepare_sites(root=tmp_path / "other", sites=2)


def test_peak_memory_counts_the_processes_started_under_it() -> None:
    hold = "import time; block = b'1' * (300 * 1024 * 1024); time.sleep(2)"
    own = tree_rss_mib(os.getpid())
    with PeakMemory(interval_s=0.1) as memory:
        subprocess.run([sys.executable, "-c", hold], check=True, timeout=60)
    # The child's 300 MiB were resident while it slept, beside this process' own memory.
    assert memory.sampled_mib > own + 290
    assert memory.peak_mib >= memory.sampled_mib
