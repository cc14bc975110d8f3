"""The buffer every MLflow call of the tracker goes through: in order, retried, kept on disk.

An operation is a small JSON object (create a run, log a batch, log artifacts, ...). Operations
are applied strictly in order; the first one that fails for a transient reason (the server is
down, slow, or answers 5xx) stops the flush, and nothing is tried again until a back-off has
passed (5 s, doubling to 60 s), so a dead tracking server costs the federation at most one
short timeout now and then. Each MLflow call runs with MLflow's HTTP timeout and retry count
lowered for its duration (MLflow's defaults can block for minutes).

Until it is sent, every operation is also in the run's ``mlflow-pending.jsonl``
(:attr:`medfed.workspace.RunPaths.mlflow_pending`; first line: the tracker's
state, e.g. which MLflow run id each logical run has; then one operation per line), so an
aggregator that stops during an outage loses nothing: the next tracker for the same run
directory loads the file and sends the rest. An operation MLflow refuses outright (an invalid
value, a deleted run) would block the queue forever: it is dropped, logged, and appended to
``mlflow-dropped.jsonl`` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.logs import redact_secrets
from medfed.storage import make_private_dirs, replace_file
from medfed.workspace import RunPaths

log = logging.getLogger("medfed.tracking")


Operation = dict[str, Any]

# MLflow error codes that no retry can fix.
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """How long one MLflow call may take, and how long to wait after a failed one."""

    timeout_s: float = 5.0
    retries: int = 0
    first_wait_s: float = 5.0
    max_wait_s: float = 60.0

    def wait_after(self, failures: int) -> float:
        return float(min(self.first_wait_s * 2 ** max(failures - 1, 0), self.max_wait_s))


_LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class PermanentError(Exception):
    """An operation that can never succeed (raised by the tracker's own checks).

    A signal to :meth:`Outbox.flush`, not a :class:`~medfed.errors.MedfedError`: it never
    reaches a user. The outbox drops the operation at once, logs it and keeps it in
    the dropped file, exactly as it does when MLflow itself refuses one, because a tracking
    problem must never stop a federation.
    """


def is_transient(exc: BaseException) -> bool:
    """True when trying the same call again later may succeed."""
    if isinstance(exc, PermanentError):
        return False
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return str(exc.error_code) not in _PERMANENT_CODES
    if type(exc).__module__.startswith("sqlalchemy."):  # e.g. a SQLite database locked
        return True
    # requests' errors are OSErrors too; a file that is missing or unreadable stays so.
    return isinstance(exc, OSError) and not isinstance(exc, _LOCAL_FILE_ERRORS)


@contextlib.contextmanager
def short_timeouts(policy: RetryPolicy) -> Iterator[None]:
    """MLflow's HTTP timeout and retries set to ``policy`` for the calls inside (env vars)."""
    values = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(policy.timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(policy.retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Outbox:
    """Operations waiting to be applied to MLflow, in order, mirrored in the run's pending file."""

    def __init__(
        self,
        *,
        paths: RunPaths,
        apply: Callable[[Operation], None],
        state: Callable[[], Mapping[str, Any]],
        policy: RetryPolicy,
    ) -> None:
        self._paths = paths
        self._apply = apply
        self._state = state
        self._policy = policy
        self._ops: deque[Operation] = deque()
        self._failures = 0
        self._retry_at = 0.0

    @property
    def path(self) -> Path:
        return self._paths.mlflow_pending

    def __len__(self) -> int:
        return len(self._ops)

    def pending(self) -> list[Operation]:
        return [dict(op) for op in self._ops]

    def load(self) -> dict[str, Any]:
        """Read operations left by an earlier tracker; the state saved with them ({} if none)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        state: dict[str, Any] = {}
        for number, line in enumerate(lines):
            try:
                item = json.loads(line)
            except ValueError:
                log.warning("%s line %d: not JSON, skipped", self.path, number + 1)
                continue
            if number == 0 and isinstance(item, dict) and "state" in item:
                state = dict(item["state"])
            elif isinstance(item, dict) and "op" in item:
                self._ops.append(item)
        if self._ops:
            log.info("%d MLflow operations left from before, to send first", len(self._ops))
        return state

    def add(self, *ops: Operation) -> None:
        """Queue ``ops`` (written to disk before anything is sent)."""
        self._ops.extend(ops)
        self.save()

    def save(self) -> None:
        """Write the queue (with the tracker's state) to disk; remove the file when empty."""
        if not self._ops:
            self.path.unlink(missing_ok=True)
            return
        lines = [json.dumps({"state": dict(self._state())}, sort_keys=True)]
        lines += [json.dumps(op, sort_keys=True) for op in self._ops]
        make_private_dirs(self._paths.directory)
        replace_file(self.path, ("\n".join(lines) + "\n").encode("utf-8"), mode=0o600)

    def flush(self, *, force: bool = False) -> bool:
        """Apply queued operations until one fails; True when nothing is left.

        Without ``force`` nothing is tried while the back-off after a failure lasts.
        """
        if not self._ops or (not force and time.monotonic() < self._retry_at):
            return not self._ops
        changed = False
        while self._ops:
            op = self._ops[0]
            try:
                with short_timeouts(self._policy):
                    self._apply(op)
            except Exception as exc:
                if is_transient(exc):
                    op["attempts"] = int(op.get("attempts", 0)) + 1
                    self._failures += 1
                    wait = self._policy.wait_after(self._failures)
                    self._retry_at = time.monotonic() + wait
                    level = logging.WARNING if self._failures == 1 else logging.DEBUG
                    log.log(
                        level,
                        "MLflow unavailable (%s: %s); %d operations kept in %s, next try in %.0f s",
                        type(exc).__name__,
                        _short(exc),
                        len(self._ops),
                        self.path,
                        wait,
                    )
                    changed = True
                    break
                self._drop(op, exc)
            else:
                if self._failures:
                    log.info("MLflow reachable again; sending %d operations", len(self._ops))
                self._failures = 0
                self._retry_at = 0.0
            self._ops.popleft()
            changed = True
        if changed:
            self.save()
        return not self._ops

    def _drop(self, op: Operation, exc: BaseException) -> None:
        log.warning(
            "MLflow refused %s for run %s (%s: %s); dropped, see %s",
            op.get("op"),
            op.get("key"),
            type(exc).__name__,
            _short(exc),
            self._paths.mlflow_dropped,
        )
        record = {"time": time.time(), "error": f"{type(exc).__name__}: {_short(exc)}", **op}
        with contextlib.suppress(OSError):
            make_private_dirs(self._paths.directory)
            with self._paths.mlflow_dropped.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = redact_secrets(" ".join(str(exc).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
