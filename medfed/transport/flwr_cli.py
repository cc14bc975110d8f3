"""The `flwr` command line as medfed uses it: the connection file, node lists, runs.

Every call runs ``flwr ... --format json`` in a subprocess against a named connection in
``$FLWR_HOME/config.toml``; nothing here imports Flower. In JSON mode flwr reports failures as
``{"success": false, ...}`` and may still exit with 0, so every reply is checked.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.errors import ConfigError, TransportError
from medfed.storage import make_private_dirs, replace_file
from medfed.transport.processes import ManagedProcess, find_command, flower_env

log = logging.getLogger("medfed.transport")

DEFAULT_CONNECTION = "medfed"
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

RunConfigValue = str | int | float | bool


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


def run_flwr(
    args: Sequence[str], *, flwr_home: Path, check: bool = True, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; its JSON reply (TransportError on failure if check)."""
    command = [find_command("flwr"), *args, "--format", "json"]
    # Errors name the flwr command (`flwr run`), not its arguments: a run's settings are a long
    # JSON value that means nothing to the user. The whole command goes to the debug log.
    shown = " ".join(args[:1])
    log.debug("flwr %s", " ".join(arg if len(arg) <= 60 else arg[:57] + "..." for arg in args))
    make_private_dirs(Path(flwr_home))
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=flower_env(flwr_home=flwr_home),
            cwd=flwr_home,  # not the caller's directory, whose pyproject.toml flwr might read
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TransportError(
            f"`flwr {shown}` did not answer within {timeout_s:.0f} s",
            hint="is the SuperLink running and reachable?",
        ) from None
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        output = (done.stderr.strip() or done.stdout.strip())[-500:]
        raise TransportError(
            f"`flwr {shown}` failed with code {done.returncode}: {output}",
            hint="run the command by hand with FLWR_HOME set to see Flower's message",
        )
    # In JSON mode flwr reports failures as {"success": false, ...} and may still exit with 0.
    if check and not reply.get("success"):
        raise TransportError(
            f"`flwr {shown}` failed: {flwr_error_text(reply)}",
            hint="is the SuperLink running, and is the connection in "
            f"{Path(flwr_home) / 'config.toml'} right?",
        )
    return reply


def flwr_error_text(reply: Mapping[str, Any]) -> str:
    """Flower's error message from a ``--format json`` reply, on one line."""
    text = str(reply.get("error-message") or reply)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


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
        if CONTROL_CHARS.search(value) is None and "'" not in value:
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
