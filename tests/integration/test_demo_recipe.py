"""The demo-recipe benchmark, small: real in-process demo runs per setting, paired by seed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "demo_recipe.py"


@pytest.mark.slow
def test_each_setting_runs_on_the_same_seeds_and_is_compared_with_the_first(
    tmp_path: Path,
) -> None:
    out = tmp_path / "recipe.json"
    command = [sys.executable, str(SCRIPT), "--multiplicities", "1,2", "--seeds", "0"]
    command += ["--cases", "8", "--size", "16", "--rounds", "1", "--local-epochs", "1"]
    done = subprocess.run(
        [*command, "--json", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["setting"], r["seed"]) for r in data["runs"]] == [("K = 1", 0), ("K = 2", 0)]
    assert all(math.isfinite(r["dice_final"]) and r["seconds"] > 0 for r in data["runs"])
    first, second = data["settings"]
    assert first["paired_gain"] == 0.0 and first["paired_se"] is None  # one seed: no error
    gain = data["runs"][1]["dice_final"] - data["runs"][0]["dice_final"]
    assert second["paired_gain"] == pytest.approx(gain)
    assert "| K = 2 | 1 |" in done.stdout
