"""Each rule of a site's policy, checked against the request before any data is read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from site_support import policy_site, round_request

from medfed.config.site import MEDFED_APP, PolicySection, SiteConfig
from medfed.envelope import RoundRequest
from medfed.errors import ConfigError, PolicyError
from medfed.site.federated import check_policy, round_config, trainable_parameters

SMALL_UNET = {"network": "unet", "channels": [4, 8], "strides": [2]}


def _request(**changes: Any) -> RoundRequest:
    values = {"run_name": "liver-2026", "project": "oncology", "model": SMALL_UNET}
    return round_request(**{**values, **changes})


def _refusal(config: SiteConfig, request: RoundRequest) -> str:
    with pytest.raises(PolicyError) as caught:
        check_policy(config, request)
    return caught.value.message


@pytest.mark.parametrize(
    ("policy", "changes", "rule"),
    [
        ({"allowed_networks": ["unet"]}, {"model": {"network": "attention_unet"}}, "allowed_net"),
        ({"max_local_epochs": 3}, {"local_epochs": 4}, "max_local_epochs 3"),
        ({"min_noise_multiplier": 1.0}, {"noise_multiplier": 0.9}, "min_noise_multiplier 1"),
        ({"max_rounds_per_run": 2}, {"planned_rounds": 3}, "max_rounds_per_run 2"),
        ({"accepted_projects": ["cardio*"]}, {}, "accepted_projects"),
        ({"accepted_runs": ["liver-19*", "kidney-*"]}, {}, "accepted_runs"),
        ({"max_parameters": 100}, {}, "policy.max_parameters 100"),
    ],
)
def test_each_rule_refuses_what_it_forbids_and_allows_its_limit(
    tmp_path: Path, policy: dict[str, Any], changes: dict[str, Any], rule: str
) -> None:
    config = policy_site(tmp_path, **policy)
    assert rule in _refusal(config, _request(**changes))
    limits: dict[str, dict[str, Any]] = {
        "allowed_networks": {"model": SMALL_UNET},
        "max_local_epochs": {"local_epochs": 3},
        "min_noise_multiplier": {"noise_multiplier": 1.0},
        "max_rounds_per_run": {"planned_rounds": 2},
        "accepted_projects": {"project": "cardio-2"},
        "accepted_runs": {"run_name": "kidney-a"},
        "max_parameters": {},
    }
    within = limits[next(iter(policy))]
    if "max_parameters" in policy:
        limit = trainable_parameters(round_config(policy_site(tmp_path), _request()))
        config = policy_site(tmp_path, max_parameters=limit)  # exactly the network's size
    check_policy(config, _request(**within))


def test_every_broken_rule_is_named_in_one_refusal_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = policy_site(
        tmp_path,
        allowed_networks=["unet"],
        max_local_epochs=1,
        min_noise_multiplier=2.0,
        max_rounds_per_run=1,
        max_parameters=10,
        accepted_projects=["cardio"],
        accepted_runs=["x-*"],
    )
    request = _request(
        model={"network": "attention_unet", "channels": [4, 8], "strides": [2]},
        noise_multiplier=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="medfed.site"):
        text = _refusal(config, request)
    for rule in (
        "allowed_networks",
        "max_local_epochs",
        "min_noise_multiplier",
        "max_rounds_per_run",
        "max_parameters",
        "accepted_projects",
        "accepted_runs",
    ):
        assert rule in text
    record = next(r for r in caplog.records if "declines" in r.getMessage())
    assert record.__dict__["run_id"] == "liver-2026" and record.__dict__["site_id"] == "site-a"
    assert record.__dict__["round"] == 1


def test_globs_are_case_sensitive_and_match_whole_names(tmp_path: Path) -> None:
    config = policy_site(tmp_path, accepted_projects=["onco*"], accepted_runs=["liver-?026"])
    check_policy(config, _request())
    assert "accepted_projects" in _refusal(config, _request(project="Oncology"))
    assert "accepted_runs" in _refusal(config, _request(run_name="liver-2026b"))


def test_a_network_too_big_is_counted_from_the_request_not_the_site(tmp_path: Path) -> None:
    config = policy_site(tmp_path)
    small = trainable_parameters(round_config(config, _request()))
    big_model = {"network": "unet", "channels": [16, 32, 64], "strides": [2, 2]}
    big = trainable_parameters(round_config(config, _request(model=big_model)))
    assert 0 < small < big
    limited = policy_site(tmp_path, max_parameters=small)
    text = _refusal(limited, _request(model=big_model))
    assert f"{big:,} trainable parameters" in text


def test_a_model_that_does_not_fit_is_still_a_config_error_with_a_size_limit(
    tmp_path: Path,
) -> None:
    config = policy_site(tmp_path, max_parameters=10**9)
    bad = {"channels": [4] * 7, "strides": [2] * 6}
    with pytest.raises(ConfigError, match="patch_size"):
        check_policy(config, _request(model=bad))
    # Beside another broken rule it becomes one more named reason of the refusal.
    text = _refusal(
        policy_site(tmp_path, max_parameters=10**9, max_local_epochs=1), _request(model=bad)
    )
    assert "max_local_epochs" in text and "patch_size" in text


def test_policy_fields_are_validated() -> None:
    assert PolicySection().allowed_app_hashes is None
    assert PolicySection().app_allow_list == (MEDFED_APP,)
    digest = "ab" * 32
    assert PolicySection(allowed_app_hashes=[MEDFED_APP, digest]).app_allow_list == (
        MEDFED_APP,
        digest,
    )
    bad: dict[str, Any]
    for bad in (
        {"allowed_app_hashes": ["AB" * 32]},
        {"allowed_app_hashes": ["abc"]},
        {"allowed_app_hashes": []},
        {"accepted_projects": [" "]},
        {"accepted_runs": []},
        {"max_rounds_per_run": 0},
        {"max_parameters": 0},
    ):
        with pytest.raises(ValidationError):
            PolicySection.model_validate(bad)
