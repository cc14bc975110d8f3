"""Run Flower's commands: the long-lived SuperLink and SuperNode with all they spawn, and the
one-shot ``flwr`` commands of the Control API (:func:`run_flwr`, JSON in and out).

Each process starts in its own session, so it leads its own process group, with its output in a
log file and an environment that keeps Flower private and quiet (see :func:`flower_env`).
Stopping is by process group: Flower's SuperNode starts ``flower-superexec`` and every
``flwr-clientapp`` in its own group, but the SuperLink starts its ``flower-superexec`` in a new
*session*, and that one starts each ``flwr-serverapp``. So :meth:`ManagedProcess.stop` first
collects the process groups of every descendant (from ``/proc`` on Linux), then sends SIGTERM to
all of them, waits, and sends SIGKILL to whatever is left.

Every started process is also remembered until it is stopped, and an ``atexit`` hook stops
what is left when the interpreter exits. A :class:`ProcessGroup` stops its processes in reverse
order when its ``with`` block ends, also on exceptions, and with ``handle_signals=True`` turns
SIGTERM/SIGHUP into ``SystemExit`` so that the same cleanup runs when a service manager stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

from medfed.errors import TransportError
from medfed.storage import make_private_dirs

DEFAULT_GRACE_S = 10.0
_POLL_S = 0.05


def venv_bin_dir() -> Path:
    """The directory of the running interpreter, where pip put Flower's commands."""
    return Path(sys.executable).parent


_FORCED_COLOUR = ("FORCE_COLOR", "CLICOLOR_FORCE")


# MLflow's client and server report usage to an outside host unless told not to; the
# ServerApp, `mlflow ui` and medfed's own processes all import mlflow.
NO_TELEMETRY: Final = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def flower_env(*, flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process or ``flwr`` command.

    The current environment, plus: this interpreter's ``bin`` first on ``PATH`` (SuperLink and
    SuperNode find ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` there),
    ``FLWR_HOME`` (config, installed apps) in a private directory instead of ``~/.flwr``, no
    telemetry of Flower or MLflow and no update check (nothing leaves the machine), then
    ``extra``. Forced colours
    (Jupyter kernels export ``FORCE_COLOR``) are dropped: they wrap ``flwr --format json`` output
    in ANSI codes that no parser reads.
    """
    env = {name: value for name, value in os.environ.items() if name not in _FORCED_COLOUR}
    path = env.get("PATH", os.defpath)
    env["PATH"] = os.pathsep.join([str(venv_bin_dir()), path])
    env["FLWR_HOME"] = str(Path(flwr_home).absolute())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.update(NO_TELEMETRY)
    env.update(extra or {})
    return env


def find_command(name: str) -> str:
    """Absolute path of a Flower command, looked up in this interpreter's ``bin`` first."""
    path = os.pathsep.join([str(venv_bin_dir()), os.environ.get("PATH", os.defpath)])
    found = shutil.which(name, path=path)
    if found is None:
        raise TransportError(
            f"command {name!r} not found next to {sys.executable} or on PATH",
            hint="install Flower with the package: pip install 'medfed[aggregator]' (or "
            "'medfed[site]' on a site)",
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for tests and demos; racy by nature)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, eq=False)
class ManagedProcess:
    """One started Flower process (the leader of its own process group) and its log file."""

    name: str
    argv: tuple[str, ...]
    log_file: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pgid(self) -> int:
        """Its process group id; equal to its pid because it starts a new session."""
        return self.popen.pid

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """The whole log so far (empty if it cannot be read)."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        """The last non-empty log lines, joined by `` | `` (for error messages)."""
        kept = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        return " | ".join(kept[-lines:])

    def wait_for_exit(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for it to exit by itself; its exit code or None."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, *, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """Stop it and everything it started; its exit code. Safe to call more than once.

        SIGTERM to the process group of the process and of each descendant, up to ``grace_s``
        seconds for all of them to go, then SIGKILL to what is left.
        """
        groups = {self.pgid} | self._descendant_groups()
        _signal_groups(groups, signal.SIGTERM)
        if not _wait_groups_gone(self.popen, groups, grace_s):
            groups |= self._descendant_groups()
            _signal_groups(groups, signal.SIGKILL)
            _wait_groups_gone(self.popen, groups, 5.0)
        try:
            code = self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            code = None
        _forget(self)
        return code

    def _descendant_groups(self) -> set[int]:
        # Only while the pid is ours: until Popen reaps the process (returncode is set), the
        # kernel cannot give its pid to another process whose children we would then kill.
        return descendant_groups(self.pid) if self.popen.returncode is None else set()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def launch(
    *,
    name: str,
    argv: Sequence[str],
    log_file: Path,
    flwr_home: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session with its output appended to ``log_file``.

    ``argv[0]`` is looked up with :func:`find_command`; ``flwr_home`` and ``cwd`` are created
    (mode 0700) if missing; ``env`` is added to :func:`flower_env`.
    """
    command = [find_command(argv[0]), *argv[1:]]
    make_private_dirs(Path(flwr_home))
    if cwd is not None:
        make_private_dirs(Path(cwd))
    log_file = Path(log_file).absolute()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower_env(flwr_home=flwr_home, extra=env),
            cwd=cwd,
            start_new_session=True,
        )
    process = ManagedProcess(name=name, argv=tuple(command), log_file=log_file, popen=popen)
    _remember(process)
    return process


class ProcessGroup:
    """Processes that belong together; the ``with`` block stops them all, last started first.

    >>> with ProcessGroup() as group:                       # doctest: +SKIP
    ...     link = group.add(start_superlink(workspace=ws, log_file=logs / "superlink.log"))
    ...     node = group.add(start_supernode(config_path=cfg, site=site, log_file=...))
    """

    def __init__(self, *, grace_s: float = DEFAULT_GRACE_S, handle_signals: bool = False) -> None:
        self._grace_s = grace_s
        self._handle_signals = handle_signals
        self._processes: list[ManagedProcess] = []
        self._previous: dict[int, Any] = {}
        self._stopping = False

    @property
    def processes(self) -> tuple[ManagedProcess, ...]:
        return tuple(self._processes)

    def add(self, process: ManagedProcess) -> ManagedProcess:
        """Take charge of ``process`` (stopped with the group); returns it."""
        self._processes.append(process)
        return process

    def launch(
        self,
        *,
        name: str,
        argv: Sequence[str],
        log_file: Path,
        flwr_home: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """:func:`launch` and :meth:`add` in one step."""
        return self.add(
            launch(name=name, argv=argv, log_file=log_file, flwr_home=flwr_home, env=env, cwd=cwd)
        )

    def stop(self) -> None:
        """Stop every process, last started first; each one is tried even if another fails."""
        self._stopping = True
        errors: list[BaseException] = []
        while self._processes:
            process = self._processes.pop()
            try:
                process.stop(grace_s=self._grace_s)
            except Exception as exc:  # pragma: no cover - keep stopping the others
                errors.append(exc)
        if errors:  # pragma: no cover
            raise errors[0]

    def __enter__(self) -> ProcessGroup:
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGHUP):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only unwind once: a second SIGTERM while the group stops must not cut the cleanup.
        if not self._stopping:
            self._stopping = True
            raise SystemExit(128 + signum)


# --- the registry behind the atexit hook -------------------------------------------------------

_LIVE: dict[int, ManagedProcess] = {}
_LIVE_LOCK = threading.Lock()


def _remember(process: ManagedProcess) -> None:
    with _LIVE_LOCK:
        _LIVE[id(process)] = process


def _forget(process: ManagedProcess) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(id(process), None)


@atexit.register
def _stop_leftovers() -> None:
    with _LIVE_LOCK:
        left = list(_LIVE.values())
    for process in reversed(left):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            process.stop(grace_s=5.0)


# --- process groups via /proc ------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, str]] | None:
    """pid -> (ppid, pgid, state) of every process, or None without a Linux ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    table: dict[int, tuple[int, int, str]] = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                stat = file.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3:
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendant_groups(pid: int) -> set[int]:
    """Process groups of all living descendants of ``pid`` (empty without ``/proc``)."""
    table = _proc_table()
    if not table:
        return set()
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    groups: set[int] = set()
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        groups.add(table[current][1])
        todo.extend(children.get(current, []))
    return groups


def _safe_groups(groups: set[int]) -> set[int]:
    # Never signal our own group, init's, or a nonsense id.
    return {g for g in groups if g > 1 and g != os.getpgrp()}


def _signal_groups(groups: set[int], signum: int) -> None:
    for pgid in _safe_groups(groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a living member (zombies do not count)."""
    return bool(_alive_groups({pgid}))


def _alive_groups(groups: set[int]) -> set[int]:
    table = _proc_table()
    if table is not None:
        return {g for _, g, state in table.values() if g in groups and state not in ("Z", "X")}
    alive = set()
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.add(pgid)
    return alive


def _wait_groups_gone(popen: subprocess.Popen[bytes], groups: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        popen.poll()  # reap our own child, so that it does not linger as a zombie
        if not _alive_groups(_safe_groups(groups)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


# --- readiness and one-shot `flwr` commands -----------------------------------------------------


def wait_until_tls_ready(
    *, process: ManagedProcess, host: str, port: int, ca_file: Path, timeout_s: float
) -> None:
    """Wait until ``host:port`` completes a TLS handshake verified with ``ca_file``."""
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    context = ssl.create_default_context(cafile=str(ca_file))
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        code = process.poll()
        if code is not None:
            raise TransportError(
                f"{process.name} exited with code {code} before it accepted connections "
                f"(log {process.log_file}: {process.log_tail()})",
                hint=f"read {process.log_file}; is port {port} in use or a TLS file unreadable?",
            )
        try:
            with (
                socket.create_connection((probe, port), timeout=2.0) as raw,
                context.wrap_socket(raw, server_hostname=probe),
            ):
                return
        except (OSError, ssl.SSLError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise TransportError(
                f"{process.name} did not accept TLS connections on {probe}:{port} within "
                f"{timeout_s:.0f} s ({last}; log {process.log_file})",
                hint=f"read {process.log_file}",
            )
        time.sleep(0.1)


def check_port_free(host: str, port: int, *, what: str) -> None:
    """:class:`TransportError` unless a listener could bind ``host:port`` now."""
    bind = {"": "0.0.0.0"}.get(host, host)
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            raise TransportError(
                f"port {port} on {host} is not free for {what} ({exc.strerror})",
                hint="stop what uses it (another SuperLink?) or choose another port",
            ) from None
