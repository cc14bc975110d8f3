"""The utility curve benchmark, small: real utility.py runs per size and epsilon, one table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "utility_curve.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("utility_curve_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_size_from_which_every_ratio_reaches_the_target() -> None:
    passes = _module().passes
    rows = [
        {"patients_per_site": 24, "epsilon": 8.0, "ratio": 0.96},
        {"patients_per_site": 48, "epsilon": 8.0, "ratio": 0.93},
        {"patients_per_site": 96, "epsilon": 8.0, "ratio": 0.97},
        {"patients_per_site": 192, "epsilon": 8.0, "ratio": 0.98},
        {"patients_per_site": 96, "epsilon": 2.0, "ratio": 0.90},
    ]
    assert passes(rows, 8.0, 0.95) == 96  # 24 passes, but 48 falls back below
    assert passes(rows, 2.0, 0.95) is None


def test_an_earlier_run_fills_the_points_this_one_does_not_measure() -> None:
    with_previous = _module().with_previous
    earlier = [
        {"task": "shapes", "patients_per_site": 24, "epsilon": 8.0, "ratio": 0.79},
        {"task": "shapes", "patients_per_site": 96, "epsilon": 8.0, "ratio": 0.85},
        {"task": "brain", "patients_per_site": 96, "epsilon": 8.0, "ratio": 0.9},
    ]
    now = [{"task": "shapes", "patients_per_site": 96, "epsilon": 8.0, "ratio": 0.88}]
    assert with_previous(now, earlier) == [earlier[0], earlier[2], now[0]]


def test_each_seed_s_dice_is_read_from_one_run_or_several() -> None:
    per_seed = _module().per_seed

    def run(seed: int, dice: float) -> dict[str, object]:
        outcomes = [{"name": "federated DP", "dice": dice}, {"name": "other", "dice": 0.0}]
        return {"args": {"seed": seed}, "outcomes": outcomes}

    assert per_seed(run(0, 0.7)) == {"0": 0.7}
    assert per_seed({"runs": [run(3, 0.6), run(4, 0.8)]}) == {"3": 0.6, "4": 0.8}


@pytest.mark.slow
def test_a_small_curve_runs_every_point_and_writes_its_rows_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "curve.json", tmp_path / "curve.png"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--patients", "12", "--epsilons", "8,2", "--jobs", "2"),
            *("--rounds", "2", "--central-epochs", "1", "--nonprivate-rounds", "1"),
            *("--nonprivate-local-epochs", "1", "--json", str(out), "--plot", str(plot)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["patients_per_site"], r["epsilon"]): r for r in data["rows"]}
    assert set(rows) == {(12, 8.0), (12, 2.0)}
    for row in rows.values():
        assert (row["task"], row["recipe"]) == ("shapes", "dp-sgd")
        # one seed: its own ratio is the mean's, the range a point
        assert row["ratio_low"] == pytest.approx(row["ratio"]) == row["ratio_high"]
        assert row["ratio"] == pytest.approx(row["dp_dice"] / row["central_dice"])
    # both epsilons were trained against the one centralised baseline of their data
    assert rows[(12, 8.0)]["central_dice"] == rows[(12, 2.0)]["central_dice"]
    assert set(data["passes"]) == {"8", "2"}
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| patients per site | epsilon |" in done.stdout
