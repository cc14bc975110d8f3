"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
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
