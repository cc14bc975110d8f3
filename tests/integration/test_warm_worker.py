"""The site node's warm worker with a real SuperLink and SuperNode (flwr 1.41, TLS, node keys).

Each message's ClientApp is forked from a worker that imported torch already, checked by the
same app guard as a cold one; a changed site config is read by the next message; a ClientApp
killed mid-message costs that message only; a killed worker is restarted, and a node whose
worker cannot be reached runs its ClientApps cold.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import APP_DIR, ECHO_ALLOWED, SITES, write_site

from medfed.config import load_site_config
from medfed.transport.deploy import register_sites, start_superlink, start_supernode
from medfed.transport.flwr_cli import submit_run, wait_for_nodes, wait_for_run
from medfed.transport.processes import ManagedProcess, ProcessGroup, free_port
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return provision_workspace(out=tmp_path / "ws", sites=SITES, host="127.0.0.1", port=free_port())


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""  # gone meanwhile


def _worker_of(node: ManagedProcess, *, not_: int | None = None) -> int:
    """The fork server the node's supervisor keeps (waits for one other than ``not_``)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        servers = [
            p for p in _children(node.pid) if p != not_ and "warm_worker serve" in _cmdline(p)
        ]
        if servers:
            return servers[0]
        time.sleep(0.1)
    pytest.fail(f"no warm worker under the node: {node.log_tail(20)}")


def _echo(flwr_home: Path, out: Path, **config: Any) -> dict[str, Any]:
    """One run of the echo app; its replies by node id."""
    import json

    out.unlink(missing_ok=True)
    run_id = submit_run(app_dir=APP_DIR, flwr_home=flwr_home, run_config={"min-nodes": 2, **config})
    status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.2)
    assert status.succeeded, status
    return {r["src_node_id"]: r for r in json.loads(out.read_text())["replies"]}


def test_clientapps_are_forked_warm_checked_and_survive_crashes(
    tmp_path: Path, workspace: Workspace
) -> None:
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "echo.json"
    allowing, guarded = SITES
    with ProcessGroup(grace_s=10.0) as group:
        group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_ECHO_OUT": str(out)},
            )
        )
        ids = {
            r.site_id: r.node_id for r in register_sites(workspace=workspace, flwr_home=flwr_home)
        }
        configs = {
            allowing: write_site(workspace, allowing, tmp_path / allowing, policy=ECHO_ALLOWED),
            guarded: write_site(workspace, guarded, tmp_path / guarded),  # medfed's app only
        }
        nodes = {
            site: group.add(
                start_supernode(
                    config_path=path,
                    site=load_site_config(path),
                    log_file=tmp_path / f"logs/{site}.log",
                )
            )
            for site, path in configs.items()
        }
        wait_for_nodes(flwr_home=flwr_home, count=2, timeout_s=60, watch=list(nodes.values()))
        node = nodes[allowing]
        worker = _worker_of(node)

        # forked from the worker, torch already imported; the other app is still refused
        replies = _echo(flwr_home, out)
        echo = replies[ids[allowing]]["content"]
        assert echo["ppid"] == worker and echo["torch_loaded"] is True
        assert echo["argv"].startswith(str(configs[allowing].parent / "work/bin/flwr-clientapp"))
        assert echo["site_epochs"] == 0
        refused = replies[ids[guarded]]
        assert refused["content"] is None and "error[app-refused]" in refused["error"]
        assert _worker_of(nodes[guarded]) > 0

        # the next message reads the site config as it is now
        site = yaml.safe_load(configs[allowing].read_text())
        site["training"] = {"epochs": 7}
        configs[allowing].write_text(yaml.safe_dump(site))
        echo = _echo(flwr_home, out)[ids[allowing]]["content"]
        assert echo["site_epochs"] == 7 and echo["ppid"] == worker

        # a killed worker is restarted; meanwhile and after, messages are answered
        os.kill(worker, signal.SIGKILL)
        worker = _worker_of(node, not_=worker)
        echo = _echo(flwr_home, out)[ids[allowing]]["content"]
        assert echo["greeting"] == "hello" and echo["torch_loaded"] is True

        # a ClientApp killed mid-message costs that message (Flower runs it again, as after a
        # cold ClientApp's crash); the worker and the node go on
        run_id = submit_run(
            app_dir=APP_DIR,
            flwr_home=flwr_home,
            run_config={"min-nodes": 2, "sleep-s": 60.0, "reply-timeout-s": 20.0},
        )
        deadline = time.monotonic() + 60
        while not (forked := _children(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert forked, node.log_tail(20)
        os.kill(forked[0], signal.SIGKILL)
        status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.2)
        assert status.succeeded, status
        assert worker in _children(node.pid) and node.running()
        log = node.log_text()
        assert "warm worker ready" in log and "restarting it" in log


def test_a_node_without_its_worker_runs_clientapps_cold(
    tmp_path: Path, workspace: Workspace
) -> None:
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "echo.json"
    with ProcessGroup(grace_s=10.0) as group:
        group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_ECHO_OUT": str(out)},
            )
        )
        ids = {
            r.site_id: r.node_id for r in register_sites(workspace=workspace, flwr_home=flwr_home)
        }
        nodes = []
        for site_id in SITES:
            path = write_site(
                workspace, site_id, tmp_path / site_id, policy=ECHO_ALLOWED, warm_worker=False
            )
            nodes.append(
                group.add(
                    start_supernode(
                        config_path=path,
                        site=load_site_config(path),
                        log_file=tmp_path / f"logs/{site_id}.log",
                    )
                )
            )
        wait_for_nodes(flwr_home=flwr_home, count=2, timeout_s=60, watch=nodes)
        replies = _echo(flwr_home, out)
        for site_id in SITES:
            echo = replies[ids[site_id]]["content"]
            assert echo["torch_loaded"] is False and echo["greeting"] == "hello"
        assert not any("warm_worker" in _cmdline(p) for n in nodes for p in _children(n.pid))
