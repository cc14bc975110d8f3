"""The `flwr` commands that only read are retried on a transient failure, and only then.

The replies are the ones Flower's CLI prints in JSON mode (``flwr/supercore/logger.py``
``print_json_error``: the command's message, a newline, the error), fed through a stand-in for
the subprocess; the clock is a fake one that moves when the retry sleeps.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from medfed.errors import TransportError
from medfed.transport.flwr_cli import (
    Retry,
    is_transient,
    list_nodes,
    run_flwr,
    run_status,
)

LOCKED = "Internal server error."  # Flower's HTTP 500 body for any unexpected exception
UNAVAILABLE = (
    "Connection to the SuperLink is unavailable. Please check your network connection and "
    "'address' in the SuperLink connection configuration."
)
AUTH = "Authentication failed. Please run `flwr login` to authenticate and try again."
RUN_STATUS = {"success": True, "runs": [{"run-id": 7, "status": "running", "status-details": ""}]}


def _failure(error: str) -> str:
    return json.dumps({"success": False, "error-message": f"Failed to list runs\n{error}"})


class _Flwr:
    """Answers each call with the next of ``replies`` (stdout text, or an exception to raise)."""

    def __init__(self, replies: Sequence[str | BaseException]) -> None:
        self.replies = list(replies)
        self.calls: list[list[str]] = []

    def __call__(
        self, command: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(command))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return subprocess.CompletedProcess(command, 0, stdout=reply, stderr="")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _retry(clock: _Clock, *, deadline_s: float = 30.0) -> Retry:
    return Retry(
        deadline_s=deadline_s, first_delay_s=0.5, max_delay_s=4.0, sleep=clock.sleep, clock=clock
    )


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        (f"Failed to list runs\n{LOCKED}", True),
        ("(sqlite3.OperationalError) database is locked", True),
        (UNAVAILABLE, True),
        (
            "Server error '503 Service Unavailable' for url 'https://127.0.0.1:9093/v1/control'",
            True,
        ),
        ("[Errno 104] Connection reset by peer", True),
        ("`flwr ls` did not answer within 120 s", True),
        (AUTH, False),
        ("[code: 4] Run ID not found.", False),
        ("[code: 2] Invalid run configuration.", False),
        ("the SuperLink does not know run 7", False),
        ("SuperLink connection 'medfed' not found in config.toml", False),
    ],
)
def test_transient_and_permanent_failures_are_told_apart(message: str, transient: bool) -> None:
    assert is_transient(message) is transient


def test_a_locked_database_then_an_answer_gives_the_status(tmp_path: Path) -> None:
    clock = _Clock()
    flwr = _Flwr([_failure(LOCKED), _failure(UNAVAILABLE), json.dumps(RUN_STATUS)])

    status = run_status(flwr_home=tmp_path, run_id=7, retry=_retry(clock), runner=flwr)

    assert (status.run_id, status.status) == (7, "running")
    assert len(flwr.calls) == 3 and clock.sleeps == [0.5, 1.0]
    assert flwr.calls[0][1:] == ["ls", "medfed", "--run-id", "7", "--format", "json"]


def test_a_timed_out_command_is_tried_again(tmp_path: Path) -> None:
    clock = _Clock()
    nodes = {"success": True, "nodes": [{"node-id": 3, "status": "online"}]}
    flwr = _Flwr([subprocess.TimeoutExpired(["flwr"], 120.0), json.dumps(nodes)])

    found = list_nodes(flwr_home=tmp_path, retry=_retry(clock), runner=flwr)

    assert [(n.node_id, n.status) for n in found] == [(3, "online")] and len(flwr.calls) == 2


def test_a_permanent_failure_fails_at_once(tmp_path: Path) -> None:
    clock = _Clock()
    flwr = _Flwr([_failure(AUTH), json.dumps(RUN_STATUS)])

    with pytest.raises(TransportError, match="Authentication failed") as raised:
        run_status(flwr_home=tmp_path, run_id=7, retry=_retry(clock), runner=flwr)

    assert len(flwr.calls) == 1 and clock.sleeps == []
    assert "is the SuperLink running" in (raised.value.hint or "")


def test_an_unknown_run_is_not_retried(tmp_path: Path) -> None:
    clock = _Clock()
    flwr = _Flwr([json.dumps({"success": True, "runs": []}), json.dumps(RUN_STATUS)])

    with pytest.raises(TransportError, match="does not know run 7"):
        run_status(flwr_home=tmp_path, run_id=7, retry=_retry(clock), runner=flwr)
    assert len(flwr.calls) == 1


def test_transient_failures_past_the_deadline_fail_with_the_last_message(tmp_path: Path) -> None:
    clock = _Clock()
    flwr = _Flwr([_failure(LOCKED)] * 20)

    with pytest.raises(TransportError) as raised:
        run_status(flwr_home=tmp_path, run_id=7, retry=_retry(clock, deadline_s=10.0), runner=flwr)

    message = raised.value.message
    assert "Internal server error." in message and "still failing after" in message
    # Waits double up to the cap and never pass the deadline.
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 2.5] and clock.now == 10.0
    assert len(flwr.calls) == 6


def test_without_a_retry_the_first_failure_is_raised(tmp_path: Path) -> None:
    flwr = _Flwr([_failure(LOCKED), json.dumps(RUN_STATUS)])

    with pytest.raises(TransportError, match="Internal server error"):
        run_flwr(["ls", "medfed"], flwr_home=tmp_path, runner=flwr)
    assert len(flwr.calls) == 1
