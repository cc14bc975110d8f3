"""Run settings: the one-step preset, central DP and EMA settings."""

from __future__ import annotations

import pytest

from medfed.config.run import RunSettings, parse_run_settings
from medfed.config.strategy import PRESETS, StrategySettings
from medfed.errors import ConfigError


def test_the_one_step_preset_expands_to_the_measured_settings() -> None:
    settings = RunSettings(run_name="study", strategy={"preset": "dp-fedadam-one-step"})
    strategy = settings.strategy
    assert (strategy.name, strategy.server_lr, strategy.beta1, strategy.beta2, strategy.tau) == (
        "fedadam",
        0.05,
        0.9,
        0.99,
        1e-3,
    )
    # benchmarks/README.md, Utility: 80 rounds x 1 local epoch, SGD lr 1.0, clip 0.5
    assert (settings.rounds, settings.local_epochs) == (80, 1)
    assert (settings.learning_rate, settings.max_grad_norm) == (1.0, 0.5)
    assert PRESETS["dp-fedadam-one-step"].site["training.optimizer"] == "sgd"
    # the expanded settings travel as JSON and come back the same
    assert RunSettings.from_json(settings.to_json()) == settings


def test_the_cosine_preset_expands_to_its_schedule_over_its_rounds() -> None:
    settings = RunSettings(run_name="study", strategy={"preset": "dp-fedadam-cosine"})
    strategy = settings.strategy
    assert (strategy.name, strategy.server_lr, strategy.server_lr_schedule) == (
        "fedadam",
        0.05,
        "cosine",
    )
    assert (settings.rounds, settings.local_epochs, settings.max_grad_norm) == (160, 1, 0.5)
    # from 0.05 at the first round to a tenth of it at the last
    rates = [strategy.server_lr_at(round=r, rounds=settings.rounds) for r in (1, 80, 160)]
    assert rates[0] == 0.05 and rates[2] == pytest.approx(0.005)
    assert 0.005 < rates[1] < 0.05
    assert RunSettings.from_json(settings.to_json()) == settings


def test_what_a_run_names_beside_the_preset_wins() -> None:
    settings = parse_run_settings(
        {
            "run_name": "study",
            "rounds": 40,
            "strategy": {"preset": "dp-fedadam-one-step", "server_lr": 0.03},
        }
    )
    assert (settings.rounds, settings.local_epochs, settings.strategy.server_lr) == (40, 1, 0.03)


def test_a_preset_with_another_strategy_or_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="preset dp-fedadam-one-step is a fedadam recipe"):
        parse_run_settings(
            {"run_name": "s", "strategy": {"preset": "dp-fedadam-one-step", "name": "fedavg"}}
        )
    with pytest.raises(ConfigError, match=r"strategy\.preset"):
        parse_run_settings({"run_name": "s", "strategy": {"preset": "fast"}})


def test_central_dp_and_ema_settings_are_checked() -> None:
    settings = parse_run_settings(
        {
            "run_name": "s",
            "strategy": {"name": "fedadam", "central_dp": {"noise_multiplier": 1, "clip_norm": 2}},
            "ema": {"decay": 0.9},
        }
    )
    assert settings.strategy.central_dp is not None
    assert settings.strategy.central_dp.delta == 1e-5
    assert settings.ema is not None and settings.ema.decay == 0.9
    for bad in (
        {"strategy": {"central_dp": {"noise_multiplier": 0, "clip_norm": 1}}},
        {"strategy": {"central_dp": {"noise_multiplier": 1}}},
        {"strategy": {"central_dp": {"noise_multiplier": 1, "clip_norm": 1, "extra": 1}}},
        {"ema": {"decay": 1.0}},
        {
            "min_sites": 3,
            "strategy": {"name": "median", "central_dp": {"noise_multiplier": 1, "clip_norm": 1}},
        },
    ):
        with pytest.raises(ConfigError):
            parse_run_settings({"run_name": "s", **bad})
    assert StrategySettings().central_dp is None
