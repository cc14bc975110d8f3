"""The secure-aggregation benchmark runs, checks its own sum, and writes its figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from medfed.config.loading import load_site_config
from medfed.config.site import SiteConfig
from medfed.run_events import (
    ModelInitialised,
    RoundDone,
    RoundStarted,
    RunEvent,
    SecureEpochStarted,
    SiteReplied,
)

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


def test_only_one_mode_is_measured_at_a_time_with_the_deployment_too(
    benchmark: ModuleType,
) -> None:
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--in-process", "--deployed"])
    assert exited.value.code == 2


def test_a_federation_needs_a_round_after_the_first(benchmark: ModuleType) -> None:
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--in-process", "--rounds", "1"])
    assert exited.value.code == 2


def test_the_large_network_has_the_parameters_the_target_names(
    benchmark: ModuleType, tmp_path: Path
) -> None:
    args = benchmark.parse(["--in-process", "--network", "4.8m", "--cases", "3"])
    setup = benchmark.prepare(tmp_path / "federation", 2, args, secure=True)
    assert 4_700_000 <= benchmark.network_parameters(setup) <= 4_900_000
    assert setup.settings.secure_aggregation
    assert setup.settings.model == benchmark.NETWORKS["4.8m"]
    # the sites' patches fit the network (a site validates a run's model against them)
    site = load_site_config(next(iter(setup.site_configs.values())))
    data = {**site.model_dump(), "model": setup.settings.model.model_dump()}
    assert SiteConfig.model_validate(data).data.patch_size == [32, 32, 32]


def _run(*, secure: bool) -> list[RunEvent]:
    """Two rounds of three sites: 100 bytes of initial weights, then 1000 per site and round."""
    events: list[RunEvent] = [ModelInitialised(run_name="r", time=10.0, site="a", parameters=9)]
    if secure:
        events.append(SecureEpochStarted(run_name="r", time=12.0, epoch=1, rounds=(1, 2)))
    events += [
        RoundStarted(run_name="r", time=12.5, round=1),
        RoundDone(run_name="r", round=1, sites_answered=3, seconds=9.0, bytes_received=3100),
        SiteReplied(run_name="r", site="a", round=2, message_type="train"),
        RoundStarted(run_name="r", time=22.0, round=2),
        RoundDone(run_name="r", round=2, sites_answered=2, seconds=4.0, bytes_received=5100),
        RoundDone(run_name="r", round=3, sites_answered=3, seconds=6.0, bytes_received=8200),
    ]
    return events


def test_a_run_is_summarised_from_its_events(benchmark: ModuleType) -> None:
    secure = benchmark.summarise(_run(secure=True))
    # rounds after the first: the first holds the key epoch and the sites' cold caches
    assert secure["first_round_seconds"] == 9.0
    assert secure["round_seconds"] == 5.0
    # per answering site: 2000 bytes from 2 sites, 3100 from 3 (the initial weights left out)
    assert secure["upload_bytes"] == pytest.approx((1000 + 3100 / 3) / 2)
    assert secure["key_epoch_seconds"] == 2.5
    assert benchmark.summarise(_run(secure=False))["key_epoch_seconds"] is None
    with pytest.raises(SystemExit):
        benchmark.summarise(_run(secure=False)[:4])


@pytest.mark.slow
def test_the_in_process_benchmark_runs_both_federations(
    benchmark: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "in-process.json"
    argv = ["--in-process", "--sites", "2", "--cases", "4", "--rounds", "2"]
    report = benchmark.main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (row,) = report["rows"]
    assert row["mode"] == "in-process" and row["sites"] == 2
    assert row["parameters"] == report["parameters"] == 5527
    assert row["round_s_plain"] > 0 and row["round_s_secure"] > 0
    assert row["round_ratio"] == pytest.approx(row["round_s_secure"] / row["round_s_plain"])
    assert row["key_epoch_s"] > 0
    # one uint32 vector (the parameters and three words) against one array per tensor
    assert row["upload_bytes_secure"] < row["upload_bytes_plain"]
    assert row["upload_ratio"] == pytest.approx(
        row["upload_bytes_secure"] / row["upload_bytes_plain"]
    )
    secure, plain = report["runs"]["2"]["secure"], report["runs"]["2"]["plain"]
    assert set(secure["stage_bytes"]) == {"keys", "shares", "open", "unmask"}
    assert plain["stage_bytes"] == {}
    # the aggregator counts what the site sent: the arrays' data and their names and headers
    assert 0 < secure["upload_bytes"] - secure["array_data_bytes"] < 100
    assert secure["array_data_bytes"] >= 4 * (5527 + 3)
