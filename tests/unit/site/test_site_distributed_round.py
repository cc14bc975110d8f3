"""A site's distributed-noise round: what its policy allows and how it sizes its share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from medfed.config.run import DistributedNoiseSettings
from medfed.config.site import SiteConfig
from medfed.errors import PolicyError
from medfed.privacy import compute_epsilon
from medfed.privacy.site_ledger import RoundPlan
from medfed.secagg.grid import Grid, grid_for
from medfed.site.distributed_round import check_allowed, plan_step


def _site(tmp_path: Path, **policy: Any) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "site_id": "site-a",
            "data": {"manifest": str(tmp_path / "missing" / "manifest.csv")},
            "paths": {"workdir": str(tmp_path / "work")},
            "privacy": {"noise_multiplier": 1.0, "epsilon_cap": 8.0},
            "policy": {"max_epsilon_per_round": 8.0, "distributed_noise": policy},
        }
    )


def _plan(config: SiteConfig, grid: Grid, *, sites: int, noise: float) -> RoundPlan:
    return plan_step(
        config=config,
        grid=grid,
        asked=DistributedNoiseSettings(sites=sites, count_share=0.25),
        requested_noise=noise,
        patients=20,
        run_id="run",
        round_index=1,
        planned_rounds=10,
    )


def test_the_policy_refuses_distributed_noise_by_default_and_names_every_rule(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path)
    with pytest.raises(PolicyError) as caught:
        check_allowed(config, DistributedNoiseSettings(sites=2, count_share=0.25))
    message = caught.value.message
    assert "policy.distributed_noise.allowed is false" in message
    assert "fewer than policy.distributed_noise.min_sites 3" in message
    check_allowed(
        _site(tmp_path, allowed=True), DistributedNoiseSettings(sites=3, count_share=0.25)
    )


def test_only_an_rdp_accountant_may_account_for_it(tmp_path: Path) -> None:
    config = _site(tmp_path, allowed=True)
    config = config.model_copy(
        update={"privacy": config.privacy.model_copy(update={"accountant": "prv"})}
    )
    with pytest.raises(PolicyError, match=r"privacy\.accountant 'prv' cannot account"):
        check_allowed(config, DistributedNoiseSettings(sites=3, count_share=0.25))


@pytest.mark.parametrize("budget", ["distributed", "local"])
def test_each_share_is_the_sums_noise_over_sqrt_sites(tmp_path: Path, budget: str) -> None:
    config = _site(tmp_path, allowed=True, budget=budget)
    grid = grid_for(dim=5_527, clip=0.5, count_share=0.25, run_id="run", round_id=1)
    plan = _plan(config, grid, sites=4, noise=2.0)
    share = plan.distributed
    assert share is not None and share.sites == 4 and share.budget == budget
    sensitivity = math.hypot(grid.l2_bound, grid.count_weight)
    assert share.noise.l2_sensitivity == pytest.approx(sensitivity)
    assert share.noise.local_stddev == pytest.approx(2.0 * sensitivity / 2)
    # at this share the discrete sum is as private as the Gaussian at the run's noise
    assert share.distributed_noise_multiplier == pytest.approx(2.0, rel=1e-9)
    assert share.local_noise_multiplier == pytest.approx(1.0, rel=1e-9)
    assert (plan.sample_rate, plan.steps) == (1.0, 1)
    assert plan.noise_multiplier == share.enforced_noise_multiplier
    assert plan.noise_multiplier == pytest.approx(2.0 if budget == "distributed" else 1.0)


def test_a_run_asking_for_less_noise_than_the_sites_own_is_refused(tmp_path: Path) -> None:
    config = _site(tmp_path, allowed=True)
    grid = grid_for(dim=100, clip=1.0, count_share=0.25, run_id="run", round_id=1)
    with pytest.raises(PolicyError, match="less than the site's"):
        _plan(config, grid, sites=3, noise=0.5)


def test_the_per_round_limit_applies_to_the_enforced_epsilon(tmp_path: Path) -> None:
    grid = grid_for(dim=100, clip=1.0, count_share=0.25, run_id="run", round_id=1)
    local = _plan(_site(tmp_path, allowed=True, budget="local"), grid, sites=9, noise=3.0)
    # the local share alone is noise 1: one step spends what Gaussian noise 1 spends
    alone = compute_epsilon(history=[local.dp_steps], delta=1e-5, accountant="rdp")
    assert alone == pytest.approx(
        compute_epsilon(history=[_gaussian(1.0)], delta=1e-5, accountant="rdp"), rel=1e-6
    )
    strict = _site(tmp_path, allowed=True, budget="local")
    strict = strict.model_copy(
        update={"policy": strict.policy.model_copy(update={"max_epsilon_per_round": 1.0})}
    )
    with pytest.raises(PolicyError, match=r"above policy\.max_epsilon_per_round 1"):
        _plan(strict, grid, sites=9, noise=3.0)


def _gaussian(noise: float) -> Any:
    from medfed.privacy import DPSteps

    return DPSteps(noise_multiplier=noise, sample_rate=1.0, steps=1)
