"""The machine the node runs on: GPU or CPU, and Python/flwr/library versions against the pins."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Callable, Sequence

from medfed.site.preflight.result import CheckResult, _fail, _pass, _warn

_LIBRARIES = ("torch", "monai", "opacus")


def cuda_device_name() -> str | None:
    """The first CUDA device's name, None without one (imports torch)."""
    import torch

    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def check_compute(
    device: str, *, probe: Callable[[], str | None] = cuda_device_name
) -> CheckResult:
    """GPU or CPU fallback: never a FAIL, since DP-SGD on CPU works, only slower."""
    name = "compute"
    try:
        gpu = probe()
    except Exception as exc:  # a broken CUDA install must not hide the other checks
        gpu, problem = None, f" (CUDA probe failed: {type(exc).__name__})"
    else:
        problem = ""
    if gpu is not None:
        return _pass(name, f"GPU {gpu} (training.device: {device})")
    if device == "cuda":
        return _warn(
            name,
            f"no GPU found{problem} but training.device is cuda: training would stop",
            "set training.device: auto (CPU fallback) or install the GPU driver and CUDA torch",
        )
    return _warn(
        name,
        f"no GPU found{problem}: training runs on CPU",
        "fine for small sites; a CUDA GPU makes rounds faster",
    )


def medfed_requirements() -> tuple[str | None, list[str]]:
    """medfed's Requires-Python and dependency pins, from the installed package metadata."""
    try:
        meta = importlib.metadata.metadata("medfed")
    except importlib.metadata.PackageNotFoundError:
        return None, []
    return meta["Requires-Python"], list(meta.get_all("Requires-Dist") or [])


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(
    *,
    python: str | None = None,
    requires_python: str | None = None,
    requirements: Sequence[str] | None = None,
    installed: Callable[[str], str | None] = installed_version,
) -> list[CheckResult]:
    """Python, flwr (FAIL on any mismatch: the node and the probe depend on its internals) and
    torch/MONAI/Opacus (WARN on a mismatch, FAIL when missing) against medfed's pins."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return [
            _warn(
                "versions",
                "not compared: the 'packaging' library is not installed",
                "pip install packaging",
            )
        ]

    if requirements is None:
        requires_python, requirements = medfed_requirements()
    python = python or platform.python_version()
    specs: dict[str, SpecifierSet] = {}
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        key = requirement.name.lower()
        specs[key] = specs.get(key, SpecifierSet()) & requirement.specifier
    reinstall = "reinstall medfed's pinned versions: pip install 'medfed[site]'"

    results: list[CheckResult] = []
    if requires_python and python not in SpecifierSet(requires_python):
        results.append(
            _fail("python", f"Python {python}, medfed needs {requires_python}", reinstall)
        )
    else:
        results.append(_pass("python", f"Python {python} ({sys.implementation.name})"))

    flwr = installed("flwr")
    wanted = specs.get("flwr")
    if flwr is None:
        results.append(_fail("flwr", "flwr is not installed", reinstall))
    elif wanted is None:
        results.append(
            _warn(
                "flwr",
                f"flwr {flwr}; medfed's pin not found in its package metadata",
                "install medfed as a package (pip install 'medfed[site]') so its pins are known",
            )
        )
    elif flwr not in wanted:
        results.append(_fail("flwr", f"flwr {flwr} installed, medfed pins {wanted}", reinstall))
    else:
        results.append(_pass("flwr", f"flwr {flwr} (pin {wanted})"))

    found: list[str] = []
    missing: list[str] = []
    off: list[str] = []
    for package in _LIBRARIES:
        version = installed(package)
        spec = specs.get(package)
        if version is None:
            missing.append(package)
        elif spec is not None and version not in spec:
            off.append(f"{package} {version} (wants {spec})")
        else:
            found.append(f"{package} {version}")
    if missing:
        results.append(_fail("libraries", f"not installed: {', '.join(missing)}", reinstall))
    elif off:
        results.append(_warn("libraries", "outside medfed's pins: " + "; ".join(off), reinstall))
    else:
        results.append(_pass("libraries", ", ".join(found)))
    return results
