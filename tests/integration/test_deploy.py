"""The real Flower deployment on loopback: SuperLink with TLS and node authentication, SuperNodes,
the `flwr` CLI, and a tiny echo app (tests/integration/flower_echo_app).

Every test starts its processes inside a ProcessGroup, so they are stopped even when an
assertion fails, and uses free ports and its own FLWR_HOME, so that runs in parallel do not meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from medfed.app_bundle import describe_app
from medfed.config.loading import load_site_config
from medfed.config.site import SiteConfig
from medfed.errors import ConfigError, TransportError
from medfed.storage import replace_file
from medfed.transport import certs
from medfed.transport.deploy import (
    NODE_CONFIG_SITE_KEY,
    SuperLinkState,
    node_config_arg,
    register_sites,
    start_superlink,
    start_supernode,
    supernode_command,
)
from medfed.transport.flwr_cli import (
    format_run_config,
    list_nodes,
    run_status,
    stop_run,
    submit_run,
    wait_for_nodes,
    wait_for_run,
    write_connection,
)
from medfed.transport.processes import (
    ManagedProcess,
    ProcessGroup,
    descendant_groups,
    free_port,
    venv_bin_dir,
)
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).parent / "flower_echo_app"
SITES = ["hospital-a", "hospital-b"]
# A site policy that lets the echo test app run besides medfed's own app.
ECHO_ALLOWED = {"allowed_app_hashes": ["medfed", describe_app(APP_DIR).content_digest]}


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return provision_workspace(out=tmp_path / "ws", sites=SITES, host="127.0.0.1", port=free_port())


def write_site(
    ws: Workspace,
    site_id: str,
    directory: Path,
    *,
    policy: dict[str, Any] | None = None,
    **transport: Path | bool,
) -> Path:
    """A site.yaml for ``site_id`` in ``directory`` (kit files by absolute path)."""
    kit = ws.path(ws.site(site_id).kit)
    section = {
        "superlink_address": ws.manifest.address,
        "root_certificates": str(kit / "ca.crt"),
        "node_private_key": str(kit / "node_key"),
        "node_public_key": str(kit / "node_key.pub"),
    } | {key: str(value) if isinstance(value, Path) else value for key, value in transport.items()}
    config = {
        "site_id": site_id,
        "data": {"manifest": "manifest.csv"},
        "paths": {"workdir": "work"},
        "policy": policy or {},
        "transport": section,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def groups_of(processes: Iterable[ManagedProcess]) -> set[int]:
    """Process groups of ``processes`` and of everything they started so far."""
    groups: set[int] = set()
    for process in processes:
        groups |= {process.pgid} | descendant_groups(process.pid)
    return groups


def assert_groups_gone(groups: set[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for pgid in groups:
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:  # pragma: no cover - the failure we test against
                pytest.fail(f"process group {pgid} still has processes")
            time.sleep(0.1)


@pytest.mark.parametrize("state", ["sqlite", "memory"])
def test_registered_nodes_run_the_echo_app(
    tmp_path: Path, workspace: Workspace, state: SuperLinkState
) -> None:
    """The same federation with the SuperLink's state in its database or only in memory."""
    flwr_home = tmp_path / "flwr-home"
    echo_out = tmp_path / "echo.json"
    with ProcessGroup(grace_s=10.0) as group:
        link = group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_WORKSPACE": str(workspace.root), "MEDFED_ECHO_OUT": str(echo_out)},
                state=state,
            )
        )
        first = register_sites(workspace=workspace, flwr_home=flwr_home)
        assert [r.site_id for r in first] == SITES
        assert all(r.node_id and not r.already_registered for r in first)
        assert {n.node_id for n in list_nodes(flwr_home=flwr_home)} == {r.node_id for r in first}
        again = register_sites(workspace=workspace, flwr_home=flwr_home)  # idempotent
        assert all(r.already_registered and r.node_id is None for r in again)

        configs: dict[str, Path] = {}
        nodes = []
        for site_id in SITES:
            # A space in the path: --node-config must quote it. The echo app is not medfed's:
            # the sites' app guard runs it only because their allow-list names it.
            configs[site_id] = write_site(
                workspace, site_id, tmp_path / f"site {site_id}", policy=ECHO_ALLOWED
            )
            site = load_site_config(configs[site_id])
            nodes.append(
                group.add(
                    start_supernode(
                        config_path=configs[site_id],
                        site=site,
                        log_file=tmp_path / f"logs/{site_id}.log",
                    )
                )
            )
        online = wait_for_nodes(flwr_home=flwr_home, count=2, timeout_s=60, watch=nodes)
        assert sorted(online) == sorted(r.node_id for r in first)

        run_id = submit_run(
            app_dir=APP_DIR,
            flwr_home=flwr_home,
            run_config={"min-nodes": 2, "wait-s": 30.0, "greeting": "it's \\ me"},
        )
        status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.5)
        assert status.succeeded, (status, link.log_tail(20))

        # The SuperLink's flower-superexec runs in a session of its own (flwr 1.41).
        groups = groups_of(group.processes)
        assert len(descendant_groups(link.pid) - {link.pgid}) == 1

    assert_groups_gone(groups)
    # Only a SuperLink with its state in sqlite writes a database.
    assert workspace.layout.superlink_db.exists() == (state == "sqlite")

    result = json.loads(echo_out.read_text(encoding="utf-8"))
    ids = {r.site_id: r.node_id for r in first}
    # NodeInfo.name in the ServerApp's grid.get_nodes() is the name given at registration.
    assert {n["name"]: n["node_id"] for n in result["nodes"]} == ids
    assert sorted(result["node_ids_online"]) == sorted(ids.values())
    assert result["env"]["MEDFED_WORKSPACE"] == str(workspace.root)
    # The ServerApp runs where the SuperLink runs, with the SuperLink's FLWR_HOME.
    assert result["cwd"] == str(workspace.root / "state")
    assert result["flwr_home"] == str(workspace.root / "state" / "flwr-home")
    assert "flwr-serverapp" in result["argv"]
    assert result["run_config"]["greeting"] == "it's \\ me"
    by_node = {r["src_node_id"]: r for r in result["replies"]}
    assert len(by_node) == 2
    for site_id, node_id in ids.items():
        reply = by_node[node_id]
        assert reply["error"] is None
        echo = reply["content"]
        assert echo[f"node_config.{NODE_CONFIG_SITE_KEY}"] == str(configs[site_id])
        assert echo["greeting"] == "it's \\ me"
        workdir = configs[site_id].parent / "work"
        assert echo["cwd"] == str(workdir)
        assert echo["flwr_home"] == str(workdir / "flwr-home")
        assert echo["telemetry"] == "0"
        # The SuperNode found the app guard first on its PATH, then this environment's bin.
        assert echo["path0"] == str(workdir / "bin")
        assert echo["path1"] == str(venv_bin_dir())
        assert echo["argv"].startswith(f"{workdir / 'bin' / 'flwr-clientapp'} --runtime-api")


def test_a_node_runs_only_the_app_bundles_its_allow_list_names(
    tmp_path: Path, workspace: Workspace
) -> None:
    flwr_home = tmp_path / "flwr-home"
    echo_out = tmp_path / "echo.json"
    guarded, allowing = SITES
    policies = {guarded: None, allowing: ECHO_ALLOWED}  # None: the medfed app only
    with ProcessGroup(grace_s=10.0) as group:
        link = group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_ECHO_OUT": str(echo_out)},
            )
        )
        ids = {
            r.site_id: r.node_id for r in register_sites(workspace=workspace, flwr_home=flwr_home)
        }
        nodes: dict[str, ManagedProcess] = {}
        for site_id, policy in policies.items():
            path = write_site(workspace, site_id, tmp_path / site_id, policy=policy)
            nodes[site_id] = group.add(
                start_supernode(
                    config_path=path,
                    site=load_site_config(path),
                    log_file=tmp_path / f"logs/{site_id}.log",
                    env={"MEDFED_LOG_FORMAT": "json"},
                )
            )
        wait_for_nodes(flwr_home=flwr_home, count=2, timeout_s=60, watch=list(nodes.values()))
        run_id = submit_run(
            app_dir=APP_DIR, flwr_home=flwr_home, run_config={"min-nodes": 2, "wait-s": 30.0}
        )
        status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.5)
        assert status.succeeded, (status, link.log_tail(20))
        assert all(node.running() for node in nodes.values())  # a refusal stops no node
        guarded_log = nodes[guarded].log_text()

    replies = {r["src_node_id"]: r for r in json.loads(echo_out.read_text())["replies"]}
    assert replies[ids[allowing]]["error"] is None
    assert replies[ids[allowing]]["content"]["greeting"] == "hello"
    refused = replies[ids[guarded]]
    assert refused["content"] is None
    assert (
        "error[app-refused]" in refused["error"]
        and "not on this site's allow-list" in (refused["error"])
    )
    assert describe_app(APP_DIR).content_digest in refused["error"]
    # Logged by the guard as a JSON line; nothing of the refused app was installed.
    lines = [json.loads(line) for line in guarded_log.splitlines() if line.startswith("{")]
    logged = [e for e in lines if e["logger"] == "medfed.site.app_guard"]
    assert logged and logged[0]["level"] == "ERROR" and logged[0]["site_id"] == guarded
    assert "allow-list" in logged[0]["message"]
    apps = tmp_path / guarded / "work" / "flwr-home" / "apps"
    assert not apps.exists() or not any(apps.iterdir())
    assert any((tmp_path / allowing / "work" / "flwr-home" / "apps").iterdir())


def test_unregistered_insecure_keyless_and_wrong_ca_nodes_are_refused(
    tmp_path: Path, workspace: Workspace
) -> None:
    flwr_home = tmp_path / "flwr-home"
    echo_out = tmp_path / "echo.json"
    other = provision_workspace(out=tmp_path / "other", sites=["x"], host="127.0.0.1", port=1)
    fresh = certs.make_node_key()
    fresh_key = tmp_path / "fresh/node_key"
    fresh_key.parent.mkdir()
    replace_file(fresh_key, fresh.private_openssh, mode=0o600)
    site_id = SITES[0]
    retry = {"max_retries": 2, "max_wait_time_s": 5.0}

    with ProcessGroup(grace_s=5.0) as group:
        link = group.add(
            start_superlink(
                workspace=workspace,
                log_file=tmp_path / "logs/superlink.log",
                env={"MEDFED_ECHO_OUT": str(echo_out)},
            )
        )
        register_sites(workspace=workspace, flwr_home=flwr_home)

        def site(name: str, **transport: Path) -> tuple[Path, SiteConfig]:
            path = write_site(workspace, site_id, tmp_path / name, **transport)
            return path, load_site_config(path)

        refused: dict[str, ManagedProcess] = {}
        path, config = site("unregistered", node_private_key=fresh_key)
        refused["unregistered"] = group.add(
            start_supernode(
                config_path=path, site=config, log_file=tmp_path / "logs/unreg.log", **retry
            )
        )
        path, config = site("wrong-ca", root_certificates=other.path(other.manifest.ca.cert))
        refused["wrong-ca"] = group.add(
            start_supernode(
                config_path=path, site=config, log_file=tmp_path / "logs/wrong-ca.log", **retry
            )
        )
        # No TLS (and so no key: flower-supernode itself refuses a key without TLS), and TLS
        # without a key: both need a command line that start_supernode never writes.
        path, config = site("insecure")
        argv = supernode_command(
            config_path=path, site=config, runtime_port=free_port(), max_retries=2
        )
        cut = argv.index("--root-certificates")
        insecure = [*argv[:cut], "--insecure", *argv[cut + 4 :]]
        assert "--auth-supernode-private-key" not in insecure
        keyless = [*argv[: cut + 2], *argv[cut + 4 :]]
        keyless[keyless.index("--port") + 1] = str(free_port())
        for name, command in (("insecure", insecure), ("keyless", keyless)):
            refused[name] = group.launch(
                name=name,
                argv=command,
                log_file=tmp_path / f"logs/{name}.log",
                flwr_home=tmp_path / f"{name}-home",
            )

        for process in refused.values():
            assert process.wait_for_exit(30.0) not in (None, 0), process.log_text()
        logs = {name: process.log_text() for name, process in refused.items()}
        assert "[code: 2004] Failed to activate SuperNode" in logs["unregistered"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["wrong-ca"]
        assert "Server disconnected without sending a response" in logs["insecure"]
        assert "[code: 2001] SuperNode authentication is enabled" in logs["keyless"]
        for name, text in logs.items():
            assert "SuperNode ID" not in text, name  # printed only once connected

        # The SuperLink knows only the two registered keys, neither of them ever online.
        nodes = list_nodes(flwr_home=flwr_home)
        assert len(nodes) == 2 and {n.status for n in nodes} == {"registered"}
        superlink_log = link.log_text()
        assert "[/v1/fleet/activate-node][ApiError:2004]" in superlink_log
        assert "[/v1/fleet/register-node][ApiError:2001]" in superlink_log

        # A run finds no node to send to: registered-but-offline nodes are not in the grid.
        run_id = submit_run(
            app_dir=APP_DIR, flwr_home=flwr_home, run_config={"min-nodes": 1, "wait-s": 0.5}
        )
        status = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=120, poll_s=0.5)
        assert status.succeeded, (status, link.log_tail(20))
        result = json.loads(echo_out.read_text(encoding="utf-8"))
        assert result["nodes"] == [] and result["replies"] == []
        assert "Push replies" not in link.log_text()


def test_stop_run_restart_keeps_state_and_a_failing_block_stops_all(
    tmp_path: Path, workspace: Workspace
) -> None:
    flwr_home = tmp_path / "flwr-home"
    waiting = {"min-nodes": 1, "wait-s": 120.0}  # no node will come: the ServerApp waits
    with ProcessGroup(grace_s=5.0) as group:
        group.add(start_superlink(workspace=workspace, log_file=tmp_path / "superlink-1.log"))
        register_sites(workspace=workspace, flwr_home=flwr_home)
        run_id = submit_run(app_dir=APP_DIR, flwr_home=flwr_home, run_config=waiting)
        assert not run_status(flwr_home=flwr_home, run_id=run_id).finished
        stop_run(flwr_home=flwr_home, run_id=run_id)
        stopped = wait_for_run(flwr_home=flwr_home, run_id=run_id, timeout_s=60, poll_s=0.5)
        assert stopped.status == "finished:stopped"
    assert (workspace.root / "state").stat().st_mode & 0o777 == 0o700

    with pytest.raises(RuntimeError, match="boom"), ProcessGroup(grace_s=5.0) as group:
        link = group.add(
            start_superlink(workspace=workspace, log_file=tmp_path / "superlink-2.log")
        )
        # The restarted SuperLink still knows the nodes and the run (state/superlink.db).
        again = register_sites(workspace=workspace, flwr_home=flwr_home)
        assert all(r.already_registered for r in again)
        assert run_status(flwr_home=flwr_home, run_id=run_id).status == "finished:stopped"

        submit_run(app_dir=APP_DIR, flwr_home=flwr_home, run_config=waiting)
        deadline = time.monotonic() + 60
        while not _has_serverapp(link) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _has_serverapp(link), link.log_tail(20)
        groups = groups_of([link])
        raise RuntimeError("boom")
    assert_groups_gone(groups)
    assert not link.running()


def _has_serverapp(link: ManagedProcess) -> bool:
    for pgid in descendant_groups(link.pid):
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            state, _, pgrp = stat[stat.rfind(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z" and b"flwr-serverapp" in cmdline:
                return True
    return False


def test_start_supernode_refuses_a_site_without_transport(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site_id: a\ndata: {manifest: m.csv}\n", encoding="utf-8")
    with pytest.raises(TransportError, match="no transport section") as info:
        start_supernode(config_path=path, site=load_site_config(path), log_file=tmp_path / "l")
    assert info.value.hint and "site.template.yaml" in info.value.hint


def test_superlink_port_in_use_is_reported(tmp_path: Path, workspace: Workspace) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", workspace.manifest.port))
        busy.listen()
        with pytest.raises(TransportError, match="not free"):
            start_superlink(workspace=workspace, log_file=tmp_path / "superlink.log")


def test_node_config_and_run_config_formats(tmp_path: Path) -> None:
    assert node_config_arg(tmp_path / "a b" / "site.yaml") == (
        f"site-config='{tmp_path / 'a b' / 'site.yaml'}'"
    )
    with pytest.raises(ConfigError, match="quote"):
        node_config_arg(tmp_path / "it's" / "site.yaml")
    assert format_run_config(
        {"a": True, "b": 3, "c": 0.5, "d": "x y", "e": "it's", "f.g": 1e-5}
    ) == ["a=true", "b=3", "c=0.5", "d='x y'", 'e="it\'s"', "f.g=1e-05"]
    with pytest.raises(ConfigError):
        format_run_config({"s": "both ' and \""})
    with pytest.raises(ConfigError):
        format_run_config({"bad key": 1})
    with pytest.raises(ConfigError):
        format_run_config({"x": float("nan")})


def test_write_connection_keeps_other_connections(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 10\n",
        encoding="utf-8",
    )
    path = write_connection(
        flwr_home=home, address="127.0.0.1:9", root_certificates=Path("ca.crt"), name="medfed"
    )
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["superlink"]["default"] == "medfed"
    assert data["superlink"]["medfed"] == {
        "address": "127.0.0.1:9",
        "root-certificates": str(Path("ca.crt").absolute()),
    }
    assert data["superlink"]["local"]["options"] == {"num-supernodes": 10}
    assert "insecure" not in path.read_text(encoding="utf-8")


_CHILD = """
import json, sys, time
from pathlib import Path
from medfed.transport.deploy import start_superlink
from medfed.transport.processes import ProcessGroup, descendant_groups
from medfed.workspace import load_workspace

ws = load_workspace(Path(sys.argv[2]))
log = Path(sys.argv[3])
if sys.argv[1] == "signal":
    with ProcessGroup(handle_signals=True) as group:
        link = group.add(start_superlink(workspace=ws, log_file=log))
        print(json.dumps(sorted({link.pgid} | descendant_groups(link.pid))), flush=True)
        time.sleep(120)
else:  # no group, no stop(): the atexit hook must clean up
    link = start_superlink(workspace=ws, log_file=log)
    print(json.dumps(sorted({link.pgid} | descendant_groups(link.pid))), flush=True)
"""


@pytest.mark.parametrize("mode", ["signal", "atexit"])
def test_sigterm_and_interpreter_exit_stop_everything(
    tmp_path: Path, workspace: Workspace, mode: str
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, str(workspace.root), str(tmp_path / "sl.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    groups: set[int] = set()
    try:
        assert child.stdout is not None
        groups = set(json.loads(child.stdout.readline()))
        assert len(groups) == 2  # the SuperLink's and its superexec's
        if mode == "signal":
            child.terminate()
        assert child.wait(timeout=30) == (143 if mode == "signal" else 0)
        assert_groups_gone(groups)
    finally:
        if child.poll() is None:  # pragma: no cover - only when the test already failed
            child.kill()
            child.wait()
        for pgid in groups:  # pragma: no cover - the same: leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
