"""The README's main job as a user runs it: synth -> check -> train -> ledger, as processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from medfed.errors import BudgetExceededError

pytestmark = pytest.mark.slow

RunMedfed = Callable[..., CompletedProcess[str]]


def test_synth_check_train_and_ledger(tmp_path: Path, run_medfed: RunMedfed) -> None:
    synth = run_medfed(
        "data",
        "synth",
        "--out",
        "site",
        "--cases",
        "8",
        "--size",
        "16",
        "--seed",
        "3",
        cwd=tmp_path,
    )
    assert synth.returncode == 0, synth.stderr
    check = run_medfed("data", "check", "--config", "site/site.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "checked 8 cases: no errors" in check.stdout

    train = run_medfed("site", "train", "--config", "site/site.yaml", "--json", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout)
    assert result["steps"] > 0 and 0 < result["epsilon_spent"] <= result["epsilon_cap"]
    assert Path(result["checkpoint"], "model.safetensors").is_file()

    ledger = run_medfed("privacy", "ledger", "--config", "site/site.yaml", "--json", cwd=tmp_path)
    assert ledger.returncode == 0, ledger.stderr
    status = json.loads(ledger.stdout)
    # terms, the released counts, the reservation and its commit
    assert status["verified"] is True and status["entries"] == 4
    assert (status["rounds"], status["releases"]) == (1, 1)
    assert status["spent"] == pytest.approx(result["epsilon_spent"], rel=1e-9)

    # The same run again would pass the cap: one line, non-zero, nothing spent.
    before = (tmp_path / "site" / ".medfed" / "ledger.jsonl").read_bytes()
    again = run_medfed("site", "train", "--config", "site/site.yaml", cwd=tmp_path)
    assert again.returncode == BudgetExceededError.exit_code == 16
    assert again.stderr.strip().startswith("error[budget-exceeded]:")
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    assert (tmp_path / "site" / ".medfed" / "ledger.jsonl").read_bytes() == before
