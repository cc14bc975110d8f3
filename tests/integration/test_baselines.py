"""The non-private research baselines: they learn, repeat exactly under a seed, and stay private.

Two small synthetic sites (8 cases of 16^3 each, different intensity shifts); real NIfTI files,
the real data pipeline and network, one CPU thread so that runs repeat bit for bit.
"""

from __future__ import annotations

import pytest

from medfed.api.baselines import BaselineResult, train_centralised, train_federated_nonprivate
from medfed.config import SiteConfig, load_site_config
from medfed.config.run import RunSettings
from medfed.data import build_datasets, synthesize_site
from medfed.errors import ConfigError
from medfed.models import resolve_device
from medfed.site.trainer import build_site_model, validation_dice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[SiteConfig]:
    root = tmp_path_factory.mktemp("baselines")
    configs = []
    for index, shift in enumerate((-0.5, 0.5)):
        result = synthesize_site(
            out=root / f"site-{index}",
            cases=8,
            size=16,
            seed=101 * index,
            site_shift=shift,
            site_id=f"site-{index}",
        )
        configs.append(load_site_config(result.config))
    return configs


def _untrained_dice(sites: list[SiteConfig], seed: int) -> float:
    """Validation Dice of the freshly seeded network, weighted by validation patients."""
    device = resolve_device(name="cpu", threads=1)
    first = sites[0]
    config = first.model_copy(update={"training": first.training.model_copy(update={"seed": seed})})
    model, _ = build_site_model(config=config, device=device)
    total, count = 0.0, 0
    for site in sites:
        val = build_datasets(site, disk_cache=False).val
        total += len(val) * validation_dice(model=model, config=site, dataset=val, device=device)
        count += len(val)
    return total / count


def _same_run(a: BaselineResult, b: BaselineResult) -> bool:
    return a.history == b.history and a.dice == b.dice and a.dice_per_site == b.dice_per_site


def test_centralised_learns_and_repeats_under_a_seed(sites: list[SiteConfig]) -> None:
    first = train_centralised(site_configs=sites, epochs=2, seed=3, threads=1)
    again = train_centralised(site_configs=sites, epochs=2, seed=3, threads=1)

    assert _same_run(first, again)
    assert [step.index for step in first.history] == [1, 2]
    assert set(first.dice_per_site) == {"site-0", "site-1"}
    assert first.dice > _untrained_dice(sites, seed=3) + 0.1, first
    assert first.history[-1].loss < first.history[0].loss
    # Another seed is another run.
    other = train_centralised(site_configs=sites, epochs=1, seed=4, threads=1)
    assert other.history[0] != first.history[0]


def test_federated_nonprivate_learns_and_repeats_under_a_seed(sites: list[SiteConfig]) -> None:
    settings = RunSettings(run_name="baseline", rounds=2, local_epochs=3, seed=5)
    first = train_federated_nonprivate(site_configs=sites, settings=settings, threads=1)
    again = train_federated_nonprivate(site_configs=sites, settings=settings, threads=1)

    assert _same_run(first, again)
    assert [step.index for step in first.history] == [1, 2]
    assert first.dice > _untrained_dice(sites, seed=5) + 0.1, first
    # The overall score is the per-site scores weighted by validation patients (2 and 2 here).
    assert first.dice == pytest.approx(sum(first.dice_per_site.values()) / 2)


def test_fedprox_term_changes_the_local_training(sites: list[SiteConfig]) -> None:
    plain = RunSettings(run_name="baseline", rounds=1, local_epochs=1)
    prox = plain.model_copy(
        update={
            "strategy": plain.strategy.model_copy(update={"name": "fedprox", "proximal_mu": 1.0})
        }
    )
    a = train_federated_nonprivate(site_configs=sites, settings=plain, threads=1)
    b = train_federated_nonprivate(site_configs=sites, settings=prox, threads=1)
    assert a.history[0].loss != b.history[0].loss or a.dice != b.dice


def test_baselines_write_nothing_at_the_sites(sites: list[SiteConfig]) -> None:
    settings = RunSettings(run_name="baseline", rounds=1, local_epochs=1)
    train_federated_nonprivate(site_configs=sites, settings=settings, threads=1)
    train_centralised(site_configs=sites, epochs=1, threads=1)
    for config in sites:
        assert not config.ledger_path.exists()
        assert not config.paths.workdir.exists()


def test_sites_that_disagree_are_refused(sites: list[SiteConfig]) -> None:
    with pytest.raises(ConfigError, match="at least one site"):
        train_centralised(site_configs=[], epochs=1)
    with pytest.raises(ConfigError, match="epochs"):
        train_centralised(site_configs=sites, epochs=0)
    with pytest.raises(ConfigError, match="repeat"):
        train_centralised(site_configs=[sites[0], sites[0]], epochs=1)
    wider = sites[1].model_copy(
        update={"model": sites[1].model.model_copy(update={"channels": [4, 8, 16]})}
    )
    with pytest.raises(ConfigError, match="model"):
        train_centralised(site_configs=[sites[0], wider], epochs=1)
