"""Peak resident memory of this process and every process it started (Ray's included).

Ray's workers are not children of the Python process that reads ``ru_maxrss`` of its children
until they exit, so the peak is sampled instead: twice a second, the resident set sizes of this
process and all its descendants (from ``/proc``) are added up, and the largest sum is kept. The
sum of resident sets counts shared pages (torch's libraries, a fork's copy-on-write pages) once
per process, an upper bound of what the processes need together; the sum of proportional set
sizes (PSS, each shared page split among its sharers) is what they take. Without ``/proc`` (not
Linux) this process' own peak is all that is known.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from typing import Final

SAMPLE_S: Final = 0.5
_PROC: Final = Path("/proc")


def process_tree(root: int) -> list[int]:
    """``root`` and the ids of all its descendants, from ``/proc`` (empty without it)."""
    children: dict[int, list[int]] = {}
    try:
        entries = list(_PROC.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        parent = _parent(entry)
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _parent(entry: Path) -> int | None:
    try:
        stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 else None


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` value in KiB (``VmRSS``, ``VmHWM``); 0 when unreadable."""
    try:
        lines = (_PROC / str(pid) / "status").read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """The process' proportional set size in KiB (``/proc/PID/smaps_rollup``); 0 if unreadable."""
    try:
        lines = (_PROC / str(pid) / "smaps_rollup").read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and its descendants now, in MiB."""
    return sum(status_kib(pid, "VmRSS") for pid in process_tree(root)) / 1024.0


def tree_pss_mib(root: int) -> float:
    """Proportional set size of ``root`` and its descendants now, in MiB."""
    return sum(pss_kib(pid) for pid in process_tree(root)) / 1024.0


def own_peak_mib() -> float:
    """This process' own peak resident memory, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class PeakMemory:
    """Samples the process tree's resident memory while the ``with`` block runs."""

    def __init__(self, *, interval_s: float = SAMPLE_S) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._peak = 0.0
        self._peak_pss = 0.0

    @property
    def sampled_mib(self) -> float:
        """The largest sum of the process tree's resident memory sampled."""
        return self._peak

    @property
    def pss_mib(self) -> float:
        """The largest sum of the process tree's proportional set sizes sampled."""
        return self._peak_pss

    @property
    def peak_mib(self) -> float:
        """The largest sum sampled, and at least this process' own peak."""
        return max(self._peak, own_peak_mib())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        pid = os.getpid()
        while True:
            tree = process_tree(pid)
            rss = sum(status_kib(p, "VmRSS") for p in tree) / 1024.0
            pss = sum(pss_kib(p) for p in tree) / 1024.0
            self._peak, self._peak_pss = max(self._peak, rss), max(self._peak_pss, pss)
            if self._stop.wait(self._interval):
                return
