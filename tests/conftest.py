"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

RunMedfed = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_medfed() -> RunMedfed:
    """Run the `medfed` command line in a fresh process, as a user would."""

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from medfed.cli.app import main; main()", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=300,
        )

    return run


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower's Message reads the running task's identity; act as one, as the in-process grid
    does."""
    from medfed.transport.inprocess import _task_identity

    with _task_identity(run_id=77):
        yield


def _warm_socket_dirs() -> set[Path]:
    from medfed.site.warm_client import TEMP_DIR_PREFIX

    return {
        path
        for path in Path(tempfile.gettempdir()).glob(f"{TEMP_DIR_PREFIX}*")
        if path.is_dir() and path.stat().st_uid == os.getuid()
    }


def _listened_on(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except FileNotFoundError:
            return False
        except OSError as exc:  # a socket file that nothing listens on any more
            return not isinstance(exc, ConnectionRefusedError)
    return True


@pytest.fixture(scope="session", autouse=True)
def _no_stale_warm_socket_dirs() -> Iterator[None]:
    """Remove the warm workers' socket directories this session left behind in the temp dir.

    A site node killed outright leaves its one there (a real site takes it over at its next
    start; the tests' workdirs are never started again). Only directories made during the
    session are touched, and only once nothing listens on their socket, so that a node of
    another session running beside this one keeps its own.
    """
    before = _warm_socket_dirs()
    yield
    for directory in _warm_socket_dirs() - before:
        if not _listened_on(directory / "worker.sock"):
            with contextlib.suppress(OSError):
                shutil.rmtree(directory)
