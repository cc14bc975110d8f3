"""Benchmarks that start processes stop them when they are stopped themselves.

SIGTERM (``kill``, a timeout) and SIGHUP (a closed terminal) end Python without running
``finally`` blocks or context managers, which would leave SuperLinks, SuperNodes and temporary
workspaces behind. Raising :class:`SystemExit` instead unwinds the benchmark as Ctrl-C does.
"""

from __future__ import annotations

import signal


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: processes stopped, temporary directories removed


def unwind_on_signals() -> None:
    """Make SIGTERM and SIGHUP exit with status 128 + the signal, through every cleanup."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
