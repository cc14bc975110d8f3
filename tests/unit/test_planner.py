"""The privacy planner: the trainer's sampling plan, composed over rounds as the ledger does."""

from __future__ import annotations

import math

import pytest

import medfed
from medfed.api.demo import planned_noise
from medfed.errors import PrivacyError
from medfed.privacy import DPSteps, compute_epsilon, plan_sampling

DELTA = 1e-5


def test_planned_noise_spends_the_target_and_round_trips() -> None:
    noise = medfed.plan_noise(
        dataset_size=19,
        batch_size=4,
        epochs_per_round=5,
        rounds=3,
        target_epsilon=8.0,
        delta=DELTA,
    )
    assert noise == pytest.approx(1.339731449006531, rel=1e-9)
    epsilon = medfed.plan_epsilon(
        dataset_size=19,
        batch_size=4,
        epochs_per_round=5,
        rounds=3,
        noise_multiplier=noise,
        delta=DELTA,
    )
    assert 8.0 - 0.01 <= epsilon <= 8.0


def test_plan_epsilon_is_the_ledger_of_the_trainer_rounds() -> None:
    # The trainer plans each round from its training patients and records one entry per round.
    per_round = plan_sampling(dataset_size=19, batch_size=4, epochs=5)
    ledger = [
        DPSteps(noise_multiplier=1.0, sample_rate=per_round.sample_rate, steps=per_round.steps)
    ] * 3
    expected = compute_epsilon(history=ledger, delta=DELTA, accountant="rdp")
    planned = medfed.plan_epsilon(
        dataset_size=19,
        batch_size=4,
        epochs_per_round=5,
        rounds=3,
        noise_multiplier=1.0,
        delta=DELTA,
    )
    assert planned == expected
    assert planned == pytest.approx(12.954247126170218, rel=1e-9)
    # 19 patients, 4 per batch: q = 4/19 and floor(19/4) = 4 steps per epoch, 20 per round
    assert (per_round.sample_rate, per_round.steps) == (4 / 19, 20)


def test_full_batch_gaussian_matches_the_hand_computed_classic_rdp_bound() -> None:
    # Batch >= patients: q = 1 and one step per epoch, so every step is the plain Gaussian
    # mechanism with RDP alpha / (2 sigma^2). Two rounds of one epoch at sigma 2:
    # epsilon = min over Opacus' orders of 2 alpha / 8 + log(1/delta) / (alpha - 1),
    # whose minimum on that grid is at alpha = 7.8: 1.95 + 11.5129 / 6.8 = 3.6431.
    epsilon = medfed.plan_epsilon(
        dataset_size=4,
        batch_size=4,
        epochs_per_round=1,
        rounds=2,
        noise_multiplier=2.0,
        delta=DELTA,
        accountant="rdp-classic",
    )
    assert epsilon == pytest.approx(1.95 + math.log(1 / DELTA) / 6.8, rel=1e-12)
    assert epsilon == pytest.approx(3.6431, abs=1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_plan_noise_and_plan_epsilon_agree_for_each_accountant(accountant: str) -> None:
    noise = medfed.plan_noise(
        dataset_size=40,
        batch_size=8,
        epochs_per_round=2,
        rounds=4,
        target_epsilon=3.0,
        delta=DELTA,
        accountant=accountant,  # type: ignore[arg-type]
    )
    epsilon = medfed.plan_epsilon(
        dataset_size=40,
        batch_size=8,
        epochs_per_round=2,
        rounds=4,
        noise_multiplier=noise,
        delta=DELTA,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert 3.0 - 0.01 <= epsilon <= 3.0


def test_the_demo_plans_with_the_planner() -> None:
    noise = planned_noise(train_patients=[24, 19, 30], epochs=15)
    exact = medfed.plan_noise(
        dataset_size=19,
        batch_size=4,
        epochs_per_round=15,
        rounds=1,
        target_epsilon=0.9 * 8.0,
        delta=DELTA,
    )
    assert noise == math.ceil(exact * 100) / 100


@pytest.mark.parametrize(
    ("field", "value"),
    [("rounds", 0), ("epochs_per_round", 0), ("rounds", 1.5), ("dataset_size", 0)],
)
def test_bad_plans_are_refused_with_a_hint(field: str, value: object) -> None:
    arguments: dict[str, object] = {
        "dataset_size": 20,
        "batch_size": 4,
        "epochs_per_round": 1,
        "rounds": 1,
        "noise_multiplier": 1.0,
        "delta": DELTA,
        field: value,
    }
    with pytest.raises(PrivacyError) as caught:
        medfed.plan_epsilon(**arguments)  # type: ignore[arg-type]
    assert caught.value.hint


def test_an_unreachable_target_is_a_privacy_error() -> None:
    with pytest.raises(PrivacyError, match="cannot be reached"):
        medfed.plan_noise(
            dataset_size=10,
            batch_size=10,
            epochs_per_round=1,
            rounds=1,
            target_epsilon=1e-3,
            delta=1e-12,
            accountant="rdp",
        )
