"""A site's checks of a federation run, before any data is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from site_support import policy_site, round_request

from medfed.errors import ConfigError, LedgerError, PolicyError
from medfed.site.federated import (
    check_policy,
    ledger_lines_since,
    round_config,
    weights_digest,
)


def test_every_broken_policy_rule_is_named(tmp_path: Path) -> None:
    config = policy_site(
        tmp_path, allowed_networks=["unet"], max_local_epochs=3, min_noise_multiplier=1.0
    )
    check_policy(config, round_request())
    with pytest.raises(PolicyError) as caught:
        check_policy(
            config,
            round_request(
                model={"network": "attention_unet"}, local_epochs=5, noise_multiplier=0.5
            ),
        )
    text = caught.value.message
    assert "allowed_networks" in text and "max_local_epochs" in text
    assert "min_noise_multiplier" in text


def test_the_run_settings_replace_the_site_settings_but_not_its_privacy(tmp_path: Path) -> None:
    config = policy_site(tmp_path)
    effective = round_config(
        config,
        round_request(
            model={"network": "unet", "channels": [4, 8, 16], "strides": [2, 2]},
            local_epochs=4,
            learning_rate=0.005,
            noise_multiplier=1.7,
            max_grad_norm=0.5,
        ),
    )
    assert effective.model.channels == [4, 8, 16]
    assert effective.training.epochs == 4 and effective.training.learning_rate == 0.005
    assert effective.privacy.max_grad_norm == 0.5
    # The run's noise goes to the trainer, which may only raise the site's own.
    assert effective.privacy == config.privacy.model_copy(update={"max_grad_norm": 0.5})


def test_a_model_that_does_not_fit_the_site_is_a_config_error(tmp_path: Path) -> None:
    config = policy_site(tmp_path)
    with pytest.raises(ConfigError, match="patch_size"):
        round_config(config, round_request(model={"channels": [4] * 7, "strides": [2] * 6}))


def test_a_ledger_shorter_than_the_aggregator_copy_is_refused(tmp_path: Path) -> None:
    config = policy_site(tmp_path)
    assert ledger_lines_since(config, 0) == (0, ())
    with pytest.raises(LedgerError, match="rolled back"):
        ledger_lines_since(config, 2)


def test_weights_digest_sees_names_shapes_dtypes_and_values() -> None:
    base = {"w": np.zeros((2, 2), np.float32)}
    digests = {
        weights_digest(base),
        weights_digest({"v": np.zeros((2, 2), np.float32)}),
        weights_digest({"w": np.zeros(4, np.float32)}),
        weights_digest({"w": np.zeros((2, 2), np.float64)}),
        weights_digest({"w": np.ones((2, 2), np.float32)}),
    }
    assert len(digests) == 5
    assert weights_digest(base) == weights_digest({"w": np.zeros((2, 2), np.float32)})
