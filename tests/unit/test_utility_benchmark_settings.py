"""benchmarks/utility.py turns its flags into the run settings the DP federation runs with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from medfed.config.run import RunSettings

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "utility.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("utility_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_cosine_flags_reach_fedadam_and_name_the_recipe() -> None:
    utility = _module()
    base = RunSettings(run_name="utility")
    args = utility.parse_args(["--rounds", "160", "--server-lr-schedule", "cosine"])
    settings = utility.run_settings(args, base, 8.07)
    strategy = settings.strategy
    assert (strategy.name, strategy.server_lr_schedule, strategy.server_lr_final) == (
        "fedadam",
        "cosine",
        0.1,
    )
    assert strategy.server_lr_at(round=1, rounds=settings.rounds) == 0.05
    assert strategy.server_lr_at(round=160, rounds=settings.rounds) == pytest.approx(0.005)
    assert utility.recipe(args) == "dp-sgd+cosine-server-lr-0.1"
    # the defaults are the constant-rate recipe the README's first table measured
    plain = utility.parse_args([])
    assert utility.run_settings(plain, base, 5.71).strategy.server_lr_schedule == "constant"
    assert utility.recipe(plain) == "dp-sgd"


def test_a_schedule_without_fedadam_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _module().parse_args(["--strategy", "fedavg", "--server-lr-schedule", "cosine"])
    assert stopped.value.code == 2
    assert "use --strategy fedadam" in capsys.readouterr().err
