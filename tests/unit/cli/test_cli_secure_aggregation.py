"""`medfed run --secure-aggregation` refuses a robust strategy before anything is submitted."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from medfed.errors import SecureAggregationError
from medfed.transport.processes import free_port
from medfed.transport.provision import provision_workspace

RunMedfed = Callable[..., subprocess.CompletedProcess[str]]


def test_a_robust_strategy_with_secure_aggregation_is_refused_in_one_line(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    out = tmp_path / "ws"
    provision_workspace(out=out, sites=["a", "b", "c"], host="127.0.0.1", port=free_port())
    result = run_medfed(
        "run",
        "--workspace",
        str(out),
        "--name",
        "r1",
        "--strategy",
        "median",
        "--min-sites",
        "3",
        "--secure-aggregation",
        cwd=out,
    )
    assert result.returncode == SecureAggregationError.exit_code == 22
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error[secure-aggregation]: ")
    assert "'median' needs each site's update" in lines[0]
    # the aggregator was never asked: no run directory was made
    assert not (out / "runs" / "r1").exists()


def test_the_flags_are_offered(run_medfed: RunMedfed, tmp_path: Path) -> None:
    for command in ("run", "demo"):
        result = run_medfed(command, "--help", cwd=tmp_path)
        assert "--secure-aggregation" in result.stdout


def test_distributed_noise_without_secure_aggregation_is_refused_in_one_line(
    tmp_path: Path, run_medfed: RunMedfed
) -> None:
    out = tmp_path / "ws"
    provision_workspace(out=out, sites=["a", "b", "c"], host="127.0.0.1", port=free_port())
    result = run_medfed(
        "run",
        *("--workspace", str(out), "--name", "r1", "--min-sites", "3"),
        *("--local-epochs", "1", "--learning-rate", "1.0", "--max-grad-norm", "0.5"),
        *("--distributed-noise", "3"),
        cwd=out,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "distributed_noise needs secure_aggregation" in lines[0]
    assert not (out / "runs" / "r1").exists()
    assert "--distributed-noise" in run_medfed("run", "--help", cwd=tmp_path).stdout
