"""Choose the compute device and the CPU thread pools for training."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from medfed.errors import DeviceError

log = logging.getLogger("medfed.models")

DeviceChoice = Literal["auto", "cpu", "cuda"]

_logged: set[str] = set()
_interop_set = False


def _log_once(message: str) -> None:
    # A site resolves its device every round; one line per process is enough.
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs allowed by a cgroup v2 quota (containers), or None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, int(int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may actually use: affinity mask and container quota, not host cores."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(count, limit) if limit is not None else count)


def _configure_cpu_threads(threads: int | None) -> int:
    global _interop_set
    count = threads if threads is not None else available_cpus()
    if count < 1:
        raise DeviceError(
            f"training.threads must be at least 1 (got {count})", hint="set threads: null"
        )
    torch.set_num_threads(count)
    # The first DP-SGD updates of a fresh network produce subnormal floats, and CPU
    # convolutions over them run up to 50x slower (seen as multi-second steps at 32^3).
    torch.set_flush_denormal(True)
    if not _interop_set:
        _interop_set = True
        try:
            # Eager training has no independent ops to run side by side; a second pool as wide
            # as the intra-op one only competes with it for the same cores.
            torch.set_num_interop_threads(1)
        except RuntimeError:
            # Allowed once per process and only before any parallel work; whoever came first
            # (an embedding application, a test) keeps its setting.
            log.debug("inter-op threads already fixed at %d", torch.get_num_interop_threads())
    return count


def resolve_device(*, name: DeviceChoice, threads: int | None) -> torch.device:
    """The torch device for ``training.device``, with CPU threads set when it is the CPU.

    ``auto`` takes CUDA when a GPU is usable and the CPU otherwise; ``cuda`` without a usable
    GPU is an error rather than a silent, much slower CPU run. On the CPU, ``threads`` (or every
    CPU this process may use) sets torch's intra-op pool.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device {name!r}", hint="use device: auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise DeviceError(
            "training.device is cuda but no usable CUDA GPU was found "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})",
            hint="use device: auto or cpu, or install a CUDA build of torch and the GPU driver",
        )
    if name == "cpu" or (name == "auto" and not has_cuda):
        count = _configure_cpu_threads(threads)
        why = "requested" if name == "cpu" else "auto: no CUDA GPU available"
        _log_once(f"device: cpu ({why}), {count} threads")
        return torch.device("cpu")
    index = torch.cuda.current_device()
    why = "requested" if name == "cuda" else "auto: CUDA GPU available"
    _log_once(f"device: cuda:{index} {torch.cuda.get_device_name(index)} ({why})")
    return torch.device("cuda", index)
