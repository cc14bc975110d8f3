"""The secure-aggregation micro-benchmark runs, checks its own sum, and writes its figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[3] / "benchmarks" / "secure_aggregation.py"


@pytest.fixture
def benchmark(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("secure_aggregation_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up by name while the script is being executed
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_core_benchmark_writes_its_figures(
    benchmark: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "secagg.json"
    argv = ["--core", "--parameters", "2000", "--sites", "3,4", "--repeats", "1"]
    benchmark.main([*argv, "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["parameters"] == 2000
    assert report["sites"] == [3, 4]
    assert set(report["mask_seconds"]) == {"3", "4"}
    assert all(seconds > 0 for seconds in report["mask_seconds"].values())
    # The weight and one extra value ride along with the 2000 parameters.
    assert report["upload_ratio"] == pytest.approx(2002 / 2000)
    assert report["answer_bytes_per_round"]["3"] == 3 * 66
    assert "| 4 |" in capsys.readouterr().out


def test_the_benchmark_says_what_it_can_measure(benchmark: ModuleType) -> None:
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--parameters", "10"])
    assert exited.value.code == 2


def test_only_one_mode_is_measured_at_a_time(benchmark: ModuleType) -> None:
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--core", "--in-process"])
    assert exited.value.code == 2


@pytest.mark.slow
def test_the_in_process_benchmark_runs_both_federations(
    benchmark: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "in-process.json"
    argv = ["--in-process", "--sites", "2", "--cases", "8", "--rounds", "1"]
    report = benchmark.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    row = report["rows"]["2"]
    assert row["plain"]["round_seconds"] > 0 and row["secure"]["round_seconds"] > 0
    assert set(row["secure"]["stage_bytes"]) == {"keys", "shares", "open", "unmask"}
    assert row["plain"]["stage_bytes"] == {}
    # one uint32 vector (the parameters and three words) against one array per tensor
    assert row["secure"]["upload_bytes"] < row["plain"]["upload_bytes"]
