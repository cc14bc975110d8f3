"""The message envelope: every medfed value survives Flower's records, and bad ones are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, RecordDict

from medfed.config.run import RunSettings, parse_run_settings
from medfed.envelope import (
    DECLINE_CODES,
    RoundReply,
    RoundRequest,
    decline_error,
    read_decline,
    read_reply,
    read_request,
    reply_content,
    request_content,
)
from medfed.errors import BudgetExceededError, ConfigError, EnvelopeError, PolicyError

WEIGHTS = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}


def _request(**changes: object) -> RoundRequest:
    values: dict[str, object] = {
        "run_name": "study-1",
        "project": "liver",
        "round": 3,
        "planned_rounds": 5,
        "model": {"network": "unet", "channels": [8, 16], "strides": [2]},
        "local_epochs": 2,
        "learning_rate": None,
        "noise_multiplier": 1.1,
        "max_grad_norm": None,
        "proximal_mu": 0.0,
        "seed": 7,
        "ledger_known": 4,
        "weights": WEIGHTS,
    }
    values.update(changes)
    return RoundRequest(**values)  # type: ignore[arg-type]


def test_a_request_round_trips_with_unset_values_kept_unset() -> None:
    back = read_request(request_content(_request()))
    assert back.run_name == "study-1" and back.round == 3 and back.ledger_known == 4
    assert back.project == "liver" and back.planned_rounds == 5
    assert back.learning_rate is None and back.max_grad_norm is None
    assert back.noise_multiplier == 1.1
    assert back.model == {"network": "unet", "channels": [8, 16], "strides": [2]}
    assert back.weights is not None
    for name, value in WEIGHTS.items():
        np.testing.assert_array_equal(back.weights[name], value)


def test_a_request_without_a_model_is_allowed_for_initialisation() -> None:
    assert read_request(request_content(_request(weights=None))).weights is None


def test_a_reply_round_trips_and_carries_weights_and_ledger_lines_only() -> None:
    reply = RoundReply(
        site_id="site-a",
        round=3,
        weights=WEIGHTS,
        ledger_first_seq=4,
        ledger_lines=('{"seq":4}', '{"seq":5}'),
    )
    content = reply_content(reply)
    # No metric record, no unsigned count, cap or delta: the ledger lines hold what is released.
    assert set(content) == {"update", "site"}
    assert set(content["site"]) == {"site_id", "round", "ledger_first_seq", "ledger_lines"}
    back = read_reply(content)
    assert back.site_id == "site-a" and back.round == 3
    assert set(back.weights) == set(WEIGHTS)
    assert back.ledger_first_seq == 4 and back.ledger_lines == reply.ledger_lines


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (RecordDict({}), "no ConfigRecord 'site'"),
        (
            RecordDict(
                {
                    "site": ConfigRecord(
                        {"site_id": "x", "round": 1, "ledger_first_seq": 0, "ledger_lines": [1]}
                    ),
                    "update": ArrayRecord(),
                }
            ),
            "ledger_lines",
        ),
        (
            RecordDict(
                {"site": ConfigRecord({"site_id": "x", "round": 1}), "update": ArrayRecord()}
            ),
            "ledger_first_seq",
        ),
    ],
)
def test_malformed_replies_are_refused_with_the_field_named(
    content: RecordDict, message: str
) -> None:
    with pytest.raises(EnvelopeError, match=message):
        read_reply(content)


def test_declines_carry_the_error_code_and_one_line_reason() -> None:
    error = decline_error(BudgetExceededError("cap 8 passed", hint="wait"))
    assert error.code == DECLINE_CODES["budget-exceeded"]
    decline = read_decline(error)
    assert decline.budget_spent and decline.code == "budget-exceeded"
    assert decline.reason == "error[budget-exceeded]: cap 8 passed (hint: wait)"
    policy = read_decline(decline_error(PolicyError("epochs")))
    assert policy.code == "policy" and not policy.budget_spent


def test_flower_errors_keep_the_last_line_of_their_traceback() -> None:
    decline = read_decline(Error(code=2, reason="Traceback ...\n  File x\nValueError: boom"))
    assert decline.code == "flower-2" and decline.reason == "ValueError: boom"


@pytest.mark.parametrize(
    "where",
    ["medfed.errors", "medfed.site.app_guard"],  # the class's module now, and at older sites
)
def test_an_error_raised_outside_the_handlers_keeps_its_medfed_code(where: str) -> None:
    # flwr-clientapp's wording of an exception raised before the app ran (the app guard).
    reason = f"<class '{where}.AppRefusedError'>:<'error[app-refused]: no'>"
    decline = read_decline(Error(code=2, reason=reason))
    assert decline.code == "app-refused" and decline.reason == "error[app-refused]: no"


def test_run_settings_refuse_unknown_keys_and_report_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_run_settings({"run_name": "bad name!", "rounds": 0, "roundz": 3})
    text = caught.value.message
    assert "run_name" in text and "rounds" in text and "roundz" in text


def test_run_settings_round_trip_as_json_and_check_robust_strategies() -> None:
    settings = RunSettings(run_name="s1", rounds=2, noise_multiplier=1.3)
    assert RunSettings.from_json(settings.to_json()) == settings
    with pytest.raises(ConfigError, match="min_sites"):
        parse_run_settings({"run_name": "s", "strategy": {"name": "median"}, "min_sites": 2})
    assert math.isfinite(settings.round_timeout_s)
