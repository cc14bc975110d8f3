"""A SuperLink with its state in memory: registered, authenticated nodes run an app, no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_deploy import APP_DIR, ECHO_ALLOWED, SITES, write_site

from medfed.config.loading import load_site_config
from medfed.transport.deploy import register_sites, start_superlink, start_supernode
from medfed.transport.flwr_cli import list_nodes, submit_run, wait_for_nodes, wait_for_run
from medfed.transport.processes import ProcessGroup, free_port
from medfed.transport.provision import provision_workspace

pytestmark = pytest.mark.slow


def test_an_in_memory_superlink_runs_a_federation_and_writes_no_database(tmp_path: Path) -> None:
    workspace = provision_workspace(
        out=tmp_path / "ws", sites=SITES, host="127.0.0.1", port=free_port()
    )
    flwr_home = tmp_path / "flwr-home"
    echo_out = tmp_path / "echo.json"
    with ProcessGroup(grace_s=10.0) as group:
        link = group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_WORKSPACE": str(workspace.root), "MEDFED_ECHO_OUT": str(echo_out)},
                state="memory",
            )
        )
        registered = register_sites(workspace=workspace, flwr_home=flwr_home)
        assert all(r.node_id and not r.already_registered for r in registered)
        assert {n.node_id for n in list_nodes(flwr_home=flwr_home)} == {
            r.node_id for r in registered
        }
        nodes = []
        for site_id in SITES:
            config = write_site(workspace, site_id, tmp_path / site_id, policy=ECHO_ALLOWED)
            nodes.append(
                group.add(
                    start_supernode(
                        config_path=config,
                        site=load_site_config(config),
                        log_file=tmp_path / f"logs/{site_id}.log",
                    )
                )
            )
        wait_for_nodes(flwr_home=flwr_home, count=len(SITES), timeout_s=60, watch=nodes)
        run_id = submit_run(app_dir=APP_DIR, flwr_home=flwr_home, run_config={"min-nodes": 2})
        status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.5)
        assert status.succeeded, (status, link.log_tail(20))

    result = json.loads(echo_out.read_text(encoding="utf-8"))
    assert len(result["replies"]) == len(SITES)
    assert all(reply["error"] is None for reply in result["replies"])
    assert not workspace.layout.superlink_db.exists()
