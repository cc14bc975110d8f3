"""Each run's aggregation and noise, as the audit states them, from the run's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfed.audit.sources import RunRecord
from medfed.audit.verify import run_mode


def _run(settings: dict[str, Any] | None) -> RunRecord:
    return RunRecord(
        name="r1",
        directory=Path("runs/r1"),
        summary=None,
        settings=settings,
        events=(),
        mlflow=None,
    )


def test_plain_secure_and_distributed_runs_are_told_apart() -> None:
    plain = run_mode(_run({"secure_aggregation": False, "strategy": {"name": "fedavg"}}))
    assert (plain.secure_aggregation, plain.distributed_sites, plain.site_level) == (
        False,
        None,
        False,
    )
    assert "each site's update" in plain.describe() and "each site's own" in plain.describe()
    shared = run_mode(
        _run({"secure_aggregation": True, "distributed_noise": {"sites": 4, "count_share": 0.25}})
    )
    assert (shared.secure_aggregation, shared.distributed_sites) == (True, 4)
    assert "only the sum" in shared.describe()
    assert "distributed over 4 sites' shares" in shared.describe()
    assert shared.to_json()["distributed_noise_sites"] == 4
    central = run_mode(_run({"strategy": {"name": "fedavg", "central_dp": {"clip": 1.0}}}))
    assert central.site_level and central.secure_aggregation is None
    assert "not recorded" in central.describe() and "site-level DP" in central.describe()
    assert run_mode(_run(None)).secure_aggregation is None
