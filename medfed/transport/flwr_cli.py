"""The `flwr` command line as medfed uses it: the connection file, node lists, runs.

Every call runs ``flwr ... --format json`` in a subprocess against a named connection in
``$FLWR_HOME/config.toml``; nothing here imports Flower. In JSON mode flwr reports failures as
``{"success": false, ...}`` and may still exit with 0, so every reply is checked. The commands
that only read (the node list, a run's status) are retried on a transient failure
(:class:`Retry`): one HTTP 500 from a busy SuperLink must not end a federation's run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

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


class CommandRunner(Protocol):
    """Runs one command to its end: :func:`run_command`, or a stand-in in tests."""

    def __call__(
        self, command: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float
    ) -> subprocess.CompletedProcess[str]: ...


def run_command(
    command: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """``command`` in a subprocess, its output captured as text (TimeoutExpired after
    ``timeout_s``)."""
    return subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=timeout_s,
        check=False,
    )


@dataclass(frozen=True)
class Retry:
    """How a read-only ``flwr`` command is tried again after a transient failure.

    Under load the SuperLink answers some requests with an HTTP 500 (its SQLite state says
    "database is locked") or drops a connection; the next request a moment later goes
    through. Waits double from ``first_delay_s`` up to ``max_delay_s``; after ``deadline_s``
    the last failure is raised. Only commands that change nothing are retried: submitting a
    run twice would start two runs.
    """

    deadline_s: float = 30.0
    first_delay_s: float = 0.5
    max_delay_s: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


READ_RETRY: Final = Retry()
# What the Flower CLI prints for a failure that a later attempt can get past: the SuperLink's
# HTTP 5xx (Flower sends "Internal server error." for any unexpected exception, its SQLite lock
# included), a dropped or refused connection ("Connection to the SuperLink is unavailable"),
# and a command that did not answer in time. Anything else (bad credentials, an unknown run, a
# refused request with a Flower error code) is permanent and fails at once.
TRANSIENT_FAILURES: Final = (
    "database is locked",
    "internal server error",
    "connection to the superlink is unavailable",
    "connection reset",
    "connection aborted",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "server error '5",  # httpx: "Server error '503 Service Unavailable' for url ..."
    "temporarily unavailable",
    "did not answer within",
)


def is_transient(message: str) -> bool:
    """Whether a failed ``flwr`` command's message is one that a retry can get past."""
    text = message.lower()
    return any(pattern in text for pattern in TRANSIENT_FAILURES)


def run_flwr(
    args: Sequence[str],
    *,
    flwr_home: Path,
    check: bool = True,
    timeout_s: float = 120.0,
    retry: Retry | None = None,
    runner: CommandRunner = run_command,
) -> dict[str, Any]:
    """Run ``flwr ARGS --format json``; its JSON reply (TransportError on failure if check).

    With ``retry``, a transient failure (:func:`is_transient`) is tried again until the
    retry's deadline; a permanent one is raised at once.
    """
    if retry is None:
        return _run_flwr_once(
            args, flwr_home=flwr_home, check=check, timeout_s=timeout_s, runner=runner
        )
    started = retry.clock()
    delay = retry.first_delay_s
    attempts = 0
    while True:
        attempts += 1
        try:
            return _run_flwr_once(
                args, flwr_home=flwr_home, check=check, timeout_s=timeout_s, runner=runner
            )
        except TransportError as exc:
            if not is_transient(exc.message):
                raise
            elapsed = retry.clock() - started
            left = retry.deadline_s - elapsed
            if left <= 0:
                raise TransportError(
                    f"{exc.message} (still failing after {attempts} attempts in {elapsed:.0f} s)",
                    hint=exc.hint,
                ) from None
            wait = min(delay, left)
            log.warning(
                "`flwr %s` failed (attempt %d), trying again in %.1f s: %s",
                " ".join(args[:1]),
                attempts,
                wait,
                exc.message,
            )
            retry.sleep(wait)
            delay = min(delay * 2, retry.max_delay_s)


def _run_flwr_once(
    args: Sequence[str], *, flwr_home: Path, check: bool, timeout_s: float, runner: CommandRunner
) -> dict[str, Any]:
    command = [find_command("flwr"), *args, "--format", "json"]
    # Errors name the flwr command (`flwr run`), not its arguments: a run's settings are a long
    # JSON value that means nothing to the user. The whole command goes to the debug log.
    shown = " ".join(args[:1])
    log.debug("flwr %s", " ".join(arg if len(arg) <= 60 else arg[:57] + "..." for arg in args))
    make_private_dirs(Path(flwr_home))
    try:
        done = runner(
            command,
            env=flower_env(flwr_home=flwr_home),
            cwd=Path(flwr_home),  # not the caller's directory, whose pyproject.toml flwr reads
            timeout_s=timeout_s,
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


def list_nodes(
    *,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    retry: Retry | None = READ_RETRY,
    runner: CommandRunner = run_command,
) -> list[NodeStatus]:
    """Every SuperNode the SuperLink knows, with its status (transient failures retried)."""
    reply = run_flwr(
        ["supernode", "ls", connection], flwr_home=flwr_home, retry=retry, runner=runner
    )
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


def run_status(
    *,
    flwr_home: Path,
    run_id: int,
    connection: str = DEFAULT_CONNECTION,
    retry: Retry | None = READ_RETRY,
    runner: CommandRunner = run_command,
) -> RunStatus:
    """The current status of run ``run_id`` (transient failures retried; an unknown run not)."""
    reply = run_flwr(
        ["ls", connection, "--run-id", str(run_id)],
        flwr_home=flwr_home,
        retry=retry,
        runner=runner,
    )
    runs = reply.get("runs") or []
    if not runs:
        raise TransportError(
            f"the SuperLink does not know run {run_id}",
            hint=f"list the runs it knows with `flwr ls {connection}`",
        )
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
