"""What a site node is doing, for `medfed site status`: kept in ``<workdir>/node/status.json``.

Three kinds of writers share the file: the long-lived `medfed site start` process (start and
stop) and the ClientApp processes Flower starts, one per message (every message handled). Each
update is a read-modify-write under an exclusive ``flock`` on ``status.json.lock``, and the new
content replaces the file atomically (temporary file, fsync, rename), so that a reader never sees
half a file and two ClientApps never lose each other's update.

"Online" is not stored: it is worked out when the status is read, from the recorded pid (alive,
the same process that was recorded, and a site node by its command line), so that a node killed
without a chance to record its stop still shows as offline.

Only run names, rounds, message kinds and error summaries are stored; never keys, never
patient data or paths (a dataset refusal is stored by its code, see
:func:`medfed.site.clientapp` ``_handle``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.config.site import SiteConfig
from medfed.storage import make_private_dirs, replace_file

STATUS_VERSION = 1
STATUS_DIR = "node"
STATUS_FILE = "status.json"
# Error texts are summaries; a long traceback-like reason is cut so the file stays small.
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class SiteStatus:
    """A site node's state as `medfed site status` shows it."""

    site_id: str
    online: bool
    # Why the node is offline (recorded stop reason, or what the liveness check found).
    offline_reason: str | None
    pid: int | None
    started_at: str | None
    stopped_at: str | None
    last_run_id: str | None
    last_round: int | None
    last_kind: str | None
    last_message_at: str | None
    messages: int
    declined: int
    last_error: str | None
    last_error_at: str | None
    epsilon_spent: float | None
    epsilon_cap: float
    epsilon_remaining: float | None
    # Set when the budget could not be read (a damaged ledger); the numbers are then None.
    budget_error: str | None
    status_file: Path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (infinite epsilon becomes null)."""
        data = asdict(self)
        data["status_file"] = str(self.status_file)
        for key in ("epsilon_spent", "epsilon_remaining"):
            value = data[key]
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None
        return data


def status_path(config: SiteConfig) -> Path:
    """Where ``config``'s node keeps its status."""
    return config.paths.workdir / STATUS_DIR / STATUS_FILE


def record_node_start(*, config: SiteConfig, pid: int) -> None:
    """Record that the site node runs as process ``pid`` (the process to check for liveness)."""
    started = _proc_start_time(pid)

    def update(state: dict[str, Any]) -> None:
        state["node"] = {
            "pid": pid,
            "proc_start": started,
            "started_at": _now(),
            "stopped_at": None,
            "stop_reason": None,
        }

    _update(config, update)


def record_node_stop(*, config: SiteConfig, reason: str) -> None:
    """Record that the node stopped, and why (shown by `medfed site status` while offline)."""

    def update(state: dict[str, Any]) -> None:
        node = state.setdefault("node", {})
        node["stopped_at"] = _now()
        node["stop_reason"] = _clip(reason)

    _update(config, update)


def record_message(
    *, config: SiteConfig, run_id: str, round: int, kind: str, error: str | None
) -> None:
    """Record one handled message: ``error`` is None when it was answered, else the refusal."""
    now = _now()

    def update(state: dict[str, Any]) -> None:
        counts = state.setdefault("counts", {"messages": 0, "declined": 0})
        counts["messages"] = int(counts.get("messages", 0)) + 1
        state["last_message"] = {"run_id": run_id, "round": round, "kind": kind, "at": now}
        if error is not None:
            counts["declined"] = int(counts.get("declined", 0)) + 1
            state["last_error"] = {
                "run_id": run_id,
                "round": round,
                "kind": kind,
                "error": _clip(error),
                "at": now,
            }

    _update(config, update)


def read_status(*, config: SiteConfig) -> SiteStatus:
    """The node's recorded state, whether it runs now, and its privacy budget from the ledger."""
    path = status_path(config)
    state = _read(path)
    node = _mapping(state.get("node"))
    last = _mapping(state.get("last_message"))
    error = _mapping(state.get("last_error"))
    counts = _mapping(state.get("counts"))
    pid = node.get("pid") if isinstance(node.get("pid"), int) else None
    online, offline_reason = _liveness(node, pid)
    spent, remaining, budget_error = _budget(config)
    return SiteStatus(
        site_id=config.site_id,
        online=online,
        offline_reason=offline_reason,
        pid=pid,
        started_at=_str(node.get("started_at")),
        stopped_at=_str(node.get("stopped_at")),
        last_run_id=_str(last.get("run_id")),
        last_round=last.get("round") if isinstance(last.get("round"), int) else None,
        last_kind=_str(last.get("kind")),
        last_message_at=_str(last.get("at")),
        messages=int(counts.get("messages", 0) or 0),
        declined=int(counts.get("declined", 0) or 0),
        last_error=_str(error.get("error")),
        last_error_at=_str(error.get("at")),
        epsilon_spent=spent,
        epsilon_cap=config.privacy.epsilon_cap,
        epsilon_remaining=remaining,
        budget_error=budget_error,
        status_file=path,
    )


# --- liveness ----------------------------------------------------------------------------------


def is_site_node_command(argv: list[str]) -> bool:
    """Whether a command line is a site node: `medfed site start` or Flower's SuperNode."""
    if any(Path(arg).name == "flower-supernode" for arg in argv):
        return True
    mentions_medfed = any("medfed" in arg for arg in argv)
    words = [arg for arg in argv if not arg.startswith("-")]
    starts_site = any(pair == ("site", "start") for pair in itertools.pairwise(words))
    return mentions_medfed and starts_site


def _liveness(node: dict[str, Any], pid: int | None) -> tuple[bool, str | None]:
    reason = _str(node.get("stop_reason"))
    if pid is None:
        return False, "the node was never started here (no status recorded)"
    if node.get("stopped_at") is not None:
        return False, f"stopped: {reason}" if reason else "stopped"
    if not _pid_alive(pid):
        return False, f"process {pid} is not running (it ended without recording a stop)"
    recorded = node.get("proc_start")
    current = _proc_start_time(pid)
    if isinstance(recorded, int) and current is not None and current != recorded:
        return False, f"process {pid} ended; its pid now belongs to another process"
    argv = _cmdline(pid)
    if argv is not None and not is_site_node_command(argv):
        return False, f"process {pid} is not a medfed site node (pid reused)"
    return True, None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A zombie (ended, not yet reaped by its parent) answers signal 0 but runs no more.
    return _proc_state(pid) not in ("Z", "X")


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split()


def _proc_state(pid: int) -> str | None:
    fields = _proc_stat_fields(pid)
    return fields[0] if fields else None


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (None without ``/proc``): with the pid
    it names one process, since the kernel may give the pid to another after it ends."""
    fields = _proc_stat_fields(pid)
    # starttime is field 22 of /proc/PID/stat, the 20th after "(comm)".
    if fields is None or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part]


# --- budget ------------------------------------------------------------------------------------


def _budget(config: SiteConfig) -> tuple[float | None, float | None, str | None]:
    from medfed.errors import MedfedError
    from medfed.site.ledger_of import ledger_of

    ledger = ledger_of(config)
    try:
        status = ledger.status(terms=config.terms)
    except MedfedError as exc:
        return None, None, exc.one_line()
    return status.spent, status.remaining, None


# --- the file ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _update(config: SiteConfig, change: Callable[[dict[str, Any]], None]) -> None:
    path = status_path(config)
    make_private_dirs(path.parent)
    with _locked(path):
        state = _read(path)
        state["version"] = STATUS_VERSION
        state["site_id"] = config.site_id
        change(state)
        data = json.dumps(state, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        replace_file(path, data, mode=0o600)


def _read(path: Path) -> dict[str, Any]:
    """The recorded state; a missing or damaged file counts as nothing recorded (the file is a
    convenience for operators, never a source of truth, so it must not stop a node)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
