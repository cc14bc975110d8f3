"""`medfed site check` against a real flwr 1.41 SuperLink (TLS, node authentication) on loopback.

A registered site passes reachability, TLS and registration; a key the SuperLink never
registered is reported as such; the probe leaves the node offline (it changes nothing at the
SuperLink). Everything started here is stopped by its ProcessGroup, also when an assertion fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from site_support import no_gpu, write_dataset

from medfed.site.onboarding import init_site
from medfed.site.preflight import PREFLIGHT_FAILED_EXIT_CODE, run_preflight
from medfed.storage import replace_file
from medfed.transport import certs
from medfed.transport.deploy import register_sites, start_superlink
from medfed.transport.flwr_cli import list_nodes
from medfed.transport.processes import ProcessGroup, free_port
from medfed.transport.provision import provision_workspace

pytestmark = pytest.mark.slow

SITE = "hospital-a"
NETWORK_CHECKS = ("aggregator reachable", "TLS", "node registered")


def test_site_check_against_a_live_superlink(tmp_path: Path) -> None:
    workspace = provision_workspace(
        out=tmp_path / "ws", sites=[SITE], host="127.0.0.1", port=free_port()
    )
    manifest = write_dataset(tmp_path / "data", cases=4)
    registered = tmp_path / "site.yaml"
    init_site(
        kit=workspace.path(workspace.site(SITE).kit),
        manifest=manifest,
        out=registered,
        delta=1e-3,
    )
    raw = yaml.safe_load(registered.read_text(encoding="utf-8"))
    raw["data"]["patch_size"] = [16, 16, 16]
    registered.write_text(yaml.safe_dump(raw), encoding="utf-8")

    # The same site with a node key the aggregator never saw.
    stranger = certs.make_node_key()
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    replace_file(stranger_dir / "node_key", stranger.private_openssh, mode=0o600)
    replace_file(stranger_dir / "node_key.pub", (stranger.public_openssh + "\n").encode())
    raw["transport"]["node_private_key"] = str(stranger_dir / "node_key")
    raw["transport"]["node_public_key"] = str(stranger_dir / "node_key.pub")
    raw["paths"]["workdir"] = str(tmp_path / "stranger-work")
    unregistered = stranger_dir / "site.yaml"
    unregistered.write_text(yaml.safe_dump(raw), encoding="utf-8")

    flwr_home = tmp_path / "flwr-home"
    with ProcessGroup(grace_s=5.0) as group:
        link = group.add(
            start_superlink(workspace=workspace, log_file=tmp_path / "logs" / "superlink.log")
        )
        before = run_preflight(config_path=registered, min_free_bytes=1, gpu_probe=no_gpu)
        register_sites(workspace=workspace, flwr_home=flwr_home)

        report = run_preflight(config_path=registered, min_free_bytes=1, gpu_probe=no_gpu)
        stranger_report = run_preflight(
            config_path=unregistered, min_free_bytes=1, gpu_probe=no_gpu
        )
        # Probing twice must not bring the node online or change it in any way.
        nodes = list_nodes(flwr_home=flwr_home)
        command = ["site", "check", "--config", str(unregistered), "--json", "--min-free-gb", "0"]
        cli = subprocess.run(
            [sys.executable, "-c", "from medfed.cli.app import main; main()", *command],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert link.running(), link.log_tail(10)
    assert link.poll() is not None  # the group stopped the SuperLink

    # Before registration the SuperLink answers, but does not know the key yet.
    assert before.result("TLS").status == "PASS"
    assert before.result("node registered").status == "FAIL"

    for name in NETWORK_CHECKS:
        assert report.result(name).status == "PASS", report.result(name)
    assert report.ok, [r for r in report.results if r.status == "FAIL"]

    assert stranger_report.result("TLS").status == "PASS"
    unknown = stranger_report.result("node registered")
    assert unknown.status == "FAIL"
    assert "does not know this node's key" in unknown.detail
    assert "flwr supernode register" in (unknown.fix or "")
    assert not stranger_report.ok

    assert len(nodes) == 1 and nodes[0].status != "online", nodes

    assert cli.returncode == PREFLIGHT_FAILED_EXIT_CODE, cli.stderr
    checks = {c["check"]: c["status"] for c in json.loads(cli.stdout)["checks"]}
    assert checks["node registered"] == "FAIL" and checks["TLS"] == "PASS"
