"""Launch the real Flower deployment (flwr 1.41) from a provisioned workspace and site configs.

The aggregator side runs ``flower-superlink`` (one HTTPS port for the Fleet, Control and Runtime
APIs, TLS from the workspace, SuperNode authentication on, state in ``<workspace>/state``); the
admin registers every site's node key with ``flwr supernode register`` and submits runs with
``flwr run``; each site runs ``flower-supernode`` with its TLS root and node key, and hands its
``site.yaml`` to the ClientApp as the node config ``site-config``. All ``flwr`` commands run as
subprocesses with ``--format json`` against a named connection in ``$FLWR_HOME/config.toml``;
nothing here imports Flower. Processes are started and stopped by
:mod:`medfed.transport.processes`.
"""

from __future__ import annotations

import json
import math
import re
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError, TransportError
from medfed.privacy.storage import make_private_dirs, replace_file
from medfed.transport.processes import (
    ManagedProcess,
    check_port_free,
    flwr_error_text,
    free_port,
    launch,
    run_flwr,
    wait_until_tls_ready,
)
from medfed.transport.provision import Workspace

DEFAULT_CONNECTION = "medfed"
# The node_config key under which a ClientApp finds the absolute path of its site's site.yaml.
NODE_CONFIG_SITE_KEY = "site-config"
STATE_DIR = "state"
SUPERLINK_DATABASE = "superlink.db"
# flwr's ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE, as `flwr supernode register` reports it.
_KEY_IN_USE = re.compile(r"\[code: 23\]|public key already in use", re.IGNORECASE)
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

RunConfigValue = str | int | float | bool


@dataclass(frozen=True)
class SiteRegistration:
    """Outcome of registering one site's node key; ``node_id`` is None if it already was."""

    site_id: str
    node_id: int | None
    already_registered: bool


@dataclass(frozen=True)
class NodeStatus:
    """A SuperNode as the SuperLink lists it: ``registered``, ``online``, ``offline``, ..."""

    node_id: int
    status: str


@dataclass(frozen=True)
class RunStatus:
    """A Flower run's state: ``pending``, ``starting``, ``running``, ``finished:<how>``."""

    run_id: int
    status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def succeeded(self) -> bool:
        return self.status == "finished:completed"


# --- SuperLink ---------------------------------------------------------------------------------


def superlink_command(*, workspace: Workspace, bind_host: str | None = None) -> list[str]:
    """The ``flower-superlink`` command line for ``workspace``."""
    manifest = workspace.manifest
    files = {
        "--ssl-ca-certfile": workspace.path(manifest.superlink.ca_cert),
        "--ssl-certfile": workspace.path(manifest.superlink.cert),
        "--ssl-keyfile": workspace.path(manifest.superlink.key),
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ConfigError(
            f"SuperLink TLS files missing: {', '.join(missing)}",
            hint="re-provision the workspace with `medfed provision`",
        )
    argv = ["flower-superlink"]
    for flag, path in files.items():
        argv += [flag, str(path)]
    argv += [
        "--enable-supernode-auth",
        "--database",
        str(workspace.root / STATE_DIR / SUPERLINK_DATABASE),
        "--host",
        bind_host or manifest.host,
        "--port",
        str(manifest.port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    return argv


def start_superlink(
    *,
    workspace: Workspace,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    flwr_home: Path | None = None,
    bind_host: str | None = None,
    ready_timeout_s: float = 60.0,
) -> ManagedProcess:
    """Start the SuperLink and return once it accepts TLS connections on its port.

    ``env`` reaches the ServerApp processes (SuperLink -> ``flower-superexec`` ->
    ``flwr-serverapp`` inherit it). ``flwr_home`` defaults to ``<workspace>/state/flwr-home``;
    ``bind_host`` to the manifest's host. Node registrations and runs are kept in
    ``<workspace>/state/superlink.db`` across restarts.
    """
    state = workspace.root / STATE_DIR
    make_private_dirs(state)
    host = bind_host or workspace.manifest.host
    port = workspace.manifest.port
    check_port_free(host, port, what="the SuperLink")
    process = launch(
        name="superlink",
        argv=superlink_command(workspace=workspace, bind_host=bind_host),
        log_file=log_file,
        flwr_home=flwr_home or state / "flwr-home",
        env=env,
        cwd=state,
    )
    try:
        wait_until_tls_ready(
            process=process,
            host=host,
            port=port,
            ca_file=workspace.path(workspace.manifest.ca.cert),
            timeout_s=ready_timeout_s,
        )
    except BaseException:
        process.stop(grace_s=5.0)
        raise
    return process


# --- connection and registration (the `flwr` CLI) ----------------------------------------------


def write_connection(
    *, flwr_home: Path, address: str, root_certificates: Path, name: str = DEFAULT_CONNECTION
) -> Path:
    """Write SuperLink connection ``name`` into ``$FLWR_HOME/config.toml``; it becomes default.

    Flower's format: ``[superlink] default = "name"`` and ``[superlink.name]`` with ``address``
    and ``root-certificates`` (an absolute path); TLS is on because ``insecure`` is absent.
    Other connections in the file are kept.
    """
    if not _CONNECTION_NAME.match(name):
        raise ConfigError(f"bad connection name {name!r}", hint="use letters, digits, '_', '-'")
    make_private_dirs(Path(flwr_home))
    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: unreadable ({exc})", hint="delete it; medfed writes it again"
            ) from None
    superlink = data.setdefault("superlink", {})
    superlink[name] = {
        "address": address,
        "root-certificates": str(Path(root_certificates).absolute()),
    }
    superlink["default"] = name
    replace_file(path, "\n".join(_toml_table(data, ())).encode("utf-8"), mode=0o600)
    return path


def register_sites(
    *,
    workspace: Workspace,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    address: str | None = None,
) -> list[SiteRegistration]:
    """Register every provisioned site's node key with the running SuperLink, named by site id.

    Writes the connection first (``address`` defaults to the manifest's). Idempotent: a key
    the SuperLink already knows (also across restarts, from its database) is reported with
    ``already_registered=True`` and no node id, since ``flwr`` does not return it then.
    """
    write_connection(
        flwr_home=flwr_home,
        address=address or workspace.manifest.address,
        root_certificates=workspace.path(workspace.manifest.ca.cert),
        name=connection,
    )
    results = []
    for entry in workspace.manifest.sites:
        key = workspace.path(entry.node_public_key_file)
        args = ["supernode", "register", str(key), connection, "--name", entry.site_id]
        reply = run_flwr(args, flwr_home=flwr_home, check=False)
        if reply.get("success"):
            node_id = int(reply["node-id"])
            results.append(SiteRegistration(entry.site_id, node_id, already_registered=False))
        elif _KEY_IN_USE.search(str(reply.get("error-message", ""))):
            results.append(SiteRegistration(entry.site_id, None, already_registered=True))
        else:
            raise TransportError(
                f"registering site {entry.site_id!r} failed: {flwr_error_text(reply)}",
                hint="is the SuperLink running and reachable with the workspace CA?",
            )
    return results


def list_nodes(*, flwr_home: Path, connection: str = DEFAULT_CONNECTION) -> list[NodeStatus]:
    """Every SuperNode the SuperLink knows, with its status."""
    reply = run_flwr(["supernode", "ls", connection], flwr_home=flwr_home)
    return [NodeStatus(int(n["node-id"]), str(n["status"])) for n in reply.get("nodes", [])]


def wait_for_nodes(
    *,
    flwr_home: Path,
    count: int,
    connection: str = DEFAULT_CONNECTION,
    timeout_s: float = 60.0,
    watch: Sequence[ManagedProcess] = (),
) -> list[int]:
    """Wait until at least ``count`` SuperNodes are online; their node ids, sorted.

    A process in ``watch`` (e.g. the SuperNodes just started) that exits ends the wait early.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        online = sorted(
            n.node_id
            for n in list_nodes(flwr_home=flwr_home, connection=connection)
            if n.status == "online"
        )
        if len(online) >= count:
            return online
        for process in watch:
            if process.poll() is not None:
                raise TransportError(
                    f"{process.name} exited with code {process.poll()} "
                    f"(log {process.log_file}: {process.log_tail()})",
                    hint=f"read {process.log_file}",
                )
        if time.monotonic() >= deadline:
            raise TransportError(
                f"only {len(online)} of {count} SuperNodes online after {timeout_s:.0f} s",
                hint="check the SuperNodes' logs; are their keys registered and their CA right?",
            )
        time.sleep(0.5)


# --- SuperNode ---------------------------------------------------------------------------------


def node_config_arg(config_path: Path) -> str:
    """The ``--node-config`` value carrying ``site.yaml``'s absolute path.

    flwr 1.41 splits the value into ``key=value`` pairs (a value quoted with ' or " may hold
    spaces) and reads each as TOML; a TOML literal string ('...') takes the path as it is,
    backslashes included, but cannot hold a quote ' or a control character.
    """
    path = str(Path(config_path).absolute())
    if "'" in path or _CONTROL_CHARS.search(path):
        raise ConfigError(
            f"{path}: a site config path with a quote (') or control character cannot be "
            "passed to Flower's --node-config",
            hint="move or rename the file (spaces are fine)",
        )
    return f"{NODE_CONFIG_SITE_KEY}='{path}'"


def supernode_command(
    *,
    config_path: Path,
    site: SiteConfig,
    runtime_port: int,
    max_retries: int | None = None,
    max_wait_time_s: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for ``site`` (whose ``transport`` must be set)."""
    transport = site.transport
    if transport is None:
        raise TransportError(
            f"{config_path}: no transport section; the node does not know its SuperLink",
            hint="copy the transport section from site.template.yaml in the site's kit",
        )
    base = Path(config_path).absolute().parent
    root = _kit_file(base, transport.root_certificates, "transport.root_certificates")
    key = _kit_file(base, transport.node_private_key, "transport.node_private_key")
    argv = [
        "flower-supernode",
        "--superlink",
        transport.superlink_address,
        "--root-certificates",
        str(root),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config_arg(config_path),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time_s is not None:
        argv += ["--max-wait-time", str(max_wait_time_s)]
    return argv


def start_supernode(
    *,
    config_path: Path,
    site: SiteConfig,
    log_file: Path,
    clientappio_port: int | None = None,
    flwr_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    max_retries: int | None = None,
    max_wait_time_s: float | None = None,
) -> ManagedProcess:
    """Start this site's SuperNode; it connects out to the SuperLink and retries until then.

    The SuperNode's local runtime API (where each ``flwr-clientapp`` fetches its message)
    listens on 127.0.0.1:``clientappio_port``, a free port if not given, so several SuperNodes
    fit on one host. ``flwr_home`` (installed app bundles) defaults to
    ``<workdir>/flwr-home``; the SuperNode and its ClientApps run in the site's workdir with
    ``env`` added to their environment. ``max_retries``/``max_wait_time_s`` bound the
    reconnection attempts (unbounded by default, right for a service).
    """
    port = clientappio_port or free_port()
    if clientappio_port is not None:
        check_port_free("127.0.0.1", port, what="the SuperNode's runtime API")
    argv = supernode_command(
        config_path=config_path,
        site=site,
        runtime_port=port,
        max_retries=max_retries,
        max_wait_time_s=max_wait_time_s,
    )
    workdir = site.paths.workdir
    if not workdir.is_absolute():
        workdir = Path(config_path).absolute().parent / workdir
    return launch(
        name=f"supernode[{site.site_id}]",
        argv=argv,
        log_file=log_file,
        flwr_home=flwr_home or workdir / "flwr-home",
        env=env,
        cwd=workdir,
    )


# --- runs --------------------------------------------------------------------------------------


def format_run_config(run_config: Mapping[str, RunConfigValue]) -> list[str]:
    """``key=value`` items for ``flwr run --run-config`` (one option each).

    Values are TOML: booleans ``true``/``false``, integers, finite floats, strings as literal
    strings ('...'), or basic strings ("...") when they contain a quote ', with escapes.
    """
    items = []
    for key, value in run_config.items():
        if not _CONFIG_KEY.match(key):
            raise ConfigError(f"run config key {key!r} is not a TOML key", hint="use a-z, 0-9, _-")
        items.append(f"{key}={_toml_value(value, key=key)}")
    return items


def submit_run(
    *,
    app_dir: Path,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    run_config: Mapping[str, RunConfigValue] | None = None,
) -> int:
    """Start the Flower app in ``app_dir`` on the SuperLink; Flower's run id.

    Every key in ``run_config`` must exist in the app's ``[tool.flwr.app.config]``.
    """
    args = ["run", str(Path(app_dir).absolute()), connection]
    for item in format_run_config(run_config or {}):
        args += ["--run-config", item]
    reply = run_flwr(args, flwr_home=flwr_home)
    return int(reply["run-id"])


def stop_run(*, flwr_home: Path, run_id: int, connection: str = DEFAULT_CONNECTION) -> None:
    """Ask the SuperLink to stop run ``run_id``."""
    run_flwr(["stop", str(run_id), connection], flwr_home=flwr_home)


def run_status(*, flwr_home: Path, run_id: int, connection: str = DEFAULT_CONNECTION) -> RunStatus:
    """The current status of run ``run_id``."""
    reply = run_flwr(["ls", connection, "--run-id", str(run_id)], flwr_home=flwr_home)
    runs = reply.get("runs") or []
    if not runs:
        raise TransportError(f"the SuperLink does not know run {run_id}")
    run = runs[0]
    return RunStatus(int(run["run-id"]), str(run["status"]), str(run.get("status-details", "")))


def wait_for_run(
    *,
    flwr_home: Path,
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
) -> RunStatus:
    """Wait until run ``run_id`` has finished (in any way); its last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run_status(flwr_home=flwr_home, run_id=run_id, connection=connection)
        if status.finished:
            return status
        if time.monotonic() >= deadline:
            raise TransportError(
                f"run {run_id} still {status.status} after {timeout_s:.0f} s",
                hint=f"stop it with `flwr stop {run_id} {connection}` or wait longer",
            )
        time.sleep(poll_s)


# --- helpers -----------------------------------------------------------------------------------


def _kit_file(base: Path, path: Path, key: str) -> Path:
    full = path if path.is_absolute() else base / path
    if not full.is_file():
        raise TransportError(
            f"{full}: file of {key} not found",
            hint="copy it from the site's kit made by `medfed provision`",
        )
    return full


def _toml_value(value: Any, *, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"run config {key}: {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if _CONTROL_CHARS.search(value) is None and "'" not in value:
            return f"'{value}'"
        if '"' in value:  # flwr's pair splitter cannot take both quote kinds in one value
            raise ConfigError(f"run config {key}: a value cannot contain both ' and \"")
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item, key=key) for item in value) + "]"
    raise ConfigError(f"setting {key}: {type(value).__name__} values are not supported")


def _toml_key(key: str) -> str:
    return key if _CONNECTION_NAME.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    lines = []
    if path and (scalars or not tables):
        lines.append("[" + ".".join(_toml_key(part) for part in path) + "]")
    lines += [f"{_toml_key(k)} = {_toml_value(v, key=k)}" for k, v in scalars]
    if lines:
        lines.append("")
    for key, sub in tables:
        lines += _toml_table(sub, (*path, key))
    return lines
