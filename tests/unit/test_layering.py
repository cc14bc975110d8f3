"""The package's layering: which parts may import which, and what the aggregator side never loads.

The aggregator, the audit, the privacy accounting and MLflow tracking run where no GPU stack is
installed (an auditor's laptop, the aggregator's server), so importing them must not load torch
or MONAI, and the aggregator keeps its global models without either. No two top-level parts of
``medfed`` import each other: the shared nouns (workspace, events, envelope, storage, errors)
live in modules of their own that both sides import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import medfed

PACKAGE = Path(medfed.__file__).parent
TORCH_FREE = (
    "medfed.aggregator",
    "medfed.audit",
    "medfed.privacy",
    "medfed.secagg",
    "medfed.tracking",
)


def _part(module: str) -> str | None:
    """The top-level part of ``medfed`` a module name belongs to (None outside medfed).

    A module at the package root (``medfed/workspace.py``) is a part of its own.
    """
    names = module.split(".")
    if names[0] != "medfed" or len(names) < 2:
        return None
    return names[1]


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> where, for every import in every module."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        source = relative.parts[0].removesuffix(".py")
        if source == "__init__":
            continue  # the package's lazy public API names every part on purpose
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from medfed import workspace`` imports the part ``workspace``
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = targets if node.module == "medfed" else [node.module]
            else:
                continue
            for target in targets:
                part = _part(target)
                if part is not None and part != source and part != "__version__":
                    edges[(source, part)].append(f"{relative}:{node.lineno}")
    return edges


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_no_two_parts_import_each_other() -> None:
    edges = _imports()
    mutual = sorted(
        f"{a} <-> {b} ({edges[(a, b)][0]}, {edges[(b, a)][0]})"
        for (a, b) in edges
        if a < b and (b, a) in edges
    )
    assert not mutual, mutual


def test_the_import_graph_is_read() -> None:
    # Guards the test above against reading nothing: known edges of the real package.
    edges = _imports()
    assert ("aggregator", "workspace") in edges and ("site", "envelope") in edges
    assert ("cli", "api") in edges and ("transport", "aggregator") in edges


def test_sites_and_settings_do_not_import_the_aggregator() -> None:
    edges = _imports()
    for part in ("site", "config", "privacy", "data", "models", "envelope", "workspace"):
        assert (part, "aggregator") not in edges, edges.get((part, "aggregator"))
    for part in ("aggregator", "audit", "privacy", "tracking"):
        for heavy in ("site", "data"):
            assert (part, heavy) not in edges, edges.get((part, heavy))


def test_aggregator_side_imports_load_neither_torch_nor_monai() -> None:
    result = _run(
        f"""
        import importlib, pkgutil, sys
        names = []
        for package in {TORCH_FREE!r}:
            module = importlib.import_module(package)
            names.append(package)
            names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in ("torch", "monai", "opacus") if m in sys.modules)
        print(len(names), ",".join(loaded))
        """
    )
    assert result.returncode == 0, result.stderr
    count, loaded = result.stdout.split()[0], result.stdout.strip().partition(" ")[2]
    assert int(count) > 30  # every module of the five parts, not just their packages
    assert loaded == ""


def test_aggregator_keeps_global_models_without_torch(tmp_path: Path) -> None:
    result = _run(
        f"""
        import importlib.abc, sys

        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "monai", "opacus"):
                    raise ImportError(f"{{name}} is not installed here")
                return None

        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from medfed.aggregator.run_store import RunStore
        from medfed.config.run import RunSettings
        from medfed.workspace import run_paths

        store = RunStore(paths=run_paths({str(tmp_path)!r}, "study"))
        settings = RunSettings(run_name="study", rounds=3)
        assert store.start(settings) is None
        weights = {{
            "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
            "conv.bias": np.array([0.5, -1.5], dtype=np.float32),
            "norm.num_batches_tracked": np.array(7, dtype=np.int64),
        }}
        moments = {{"m.conv.bias": np.array([0.1, 0.2], dtype=np.float32)}}
        spec = {{"network": "unet", "channels": [8, 16]}}
        store.save_round(
            round=2, weights=weights, spec=spec, strategy_state=moments, metadata={{"round": 2}}
        )
        point = store.start(settings.model_copy(update={{"resume": True}}))
        assert point.round == 2 and dict(point.spec) == spec
        assert sorted(point.weights) == sorted(weights)
        for name, array in weights.items():
            assert point.weights[name].dtype == array.dtype
            assert np.array_equal(point.weights[name], array)
        assert np.array_equal(point.strategy_state["m.conv.bias"], moments["m.conv.bias"])
        print("torch" in sys.modules, "monai" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
