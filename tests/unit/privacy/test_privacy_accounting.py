"""Composition, conversions, calibration and input validation of the accountants."""

from __future__ import annotations

import math

import pytest

from medfed.errors import PrivacyError
from medfed.privacy import (
    ACCOUNTANTS,
    AccountantName,
    DPSteps,
    compute_epsilon,
    conversion_of,
    noise_for_target_epsilon,
)

DELTA = 1e-5
ROUND = DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=100)


@pytest.mark.parametrize("accountant", ["rdp", "rdp-classic", "prv", "pld"])
def test_three_rounds_compose_like_one_long_run(accountant: AccountantName) -> None:
    rounds = compute_epsilon(history=[ROUND] * 3, delta=DELTA, accountant=accountant)
    single = compute_epsilon(
        history=[DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=300)],
        delta=DELTA,
        accountant=accountant,
    )
    one_round = compute_epsilon(history=[ROUND], delta=DELTA, accountant=accountant)
    assert rounds == single
    # Summing per-round epsilons over-reports; keeping only the last round under-reports.
    assert one_round < rounds < 3 * one_round


def test_rdp_matches_one_opacus_accountant_kept_across_rounds() -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    history = [
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=100),
        DPSteps(noise_multiplier=1.3, sample_rate=0.02, steps=50),
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=70),
    ]
    for entry in history:
        for _ in range(entry.steps):
            accountant.step(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate)
    expected = accountant.get_epsilon(delta=DELTA)
    assert compute_epsilon(history=history, delta=DELTA, accountant="rdp") == pytest.approx(
        expected, rel=1e-12
    )


def test_prv_matches_one_opacus_accountant_kept_across_rounds() -> None:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    for _ in range(3):
        for _ in range(ROUND.steps):
            accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    expected = accountant.get_epsilon(delta=DELTA)
    ours = compute_epsilon(history=[ROUND] * 3, delta=DELTA, accountant="prv")
    assert ours == pytest.approx(expected, rel=1e-9)


def test_heterogeneous_history_order_does_not_matter() -> None:
    history = [
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=100),
        DPSteps(noise_multiplier=2.0, sample_rate=0.02, steps=50),
        DPSteps(noise_multiplier=0.8, sample_rate=0.005, steps=300),
    ]
    forward = compute_epsilon(history=history, delta=DELTA, accountant="pld")
    backward = compute_epsilon(history=history[::-1], delta=DELTA, accountant="pld")
    parts = [compute_epsilon(history=[e], delta=DELTA, accountant="pld") for e in history]
    assert forward == pytest.approx(backward, rel=1e-3)
    assert max(parts) < forward < sum(parts)


def test_classic_conversion_matches_closed_form_for_gaussian() -> None:
    """Without subsampling the RDP curve is T*alpha/(2 sigma^2); classic epsilon follows."""
    from opacus.accountants import RDPAccountant

    sigma, steps, delta = 3.0, 10, 1e-6
    expected = min(
        steps * alpha / (2 * sigma**2) + math.log(1 / delta) / (alpha - 1)
        for alpha in RDPAccountant.DEFAULT_ALPHAS
    )
    history = [DPSteps(noise_multiplier=sigma, sample_rate=1.0, steps=steps)]
    classic = compute_epsilon(history=history, delta=delta, accountant="rdp-classic")
    assert classic == pytest.approx(expected, rel=1e-9)
    assert compute_epsilon(history=history, delta=delta, accountant="rdp") < classic


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_empty_and_zero_step_history_is_zero(accountant: AccountantName) -> None:
    zero = DPSteps(noise_multiplier=1.0, sample_rate=0.5, steps=0)
    assert compute_epsilon(history=[], delta=DELTA, accountant=accountant) == 0.0
    assert compute_epsilon(history=[zero], delta=DELTA, accountant=accountant) == 0.0
    with_zero = compute_epsilon(history=[ROUND, zero], delta=DELTA, accountant=accountant)
    assert with_zero == compute_epsilon(history=[ROUND], delta=DELTA, accountant=accountant)


def test_every_accountant_names_its_conversion() -> None:
    assert conversion_of("rdp").startswith("rdp-improved")
    assert conversion_of("rdp-classic").startswith("rdp-classic")
    assert conversion_of("prv").startswith("prv")
    assert conversion_of("pld").startswith("pld")


@pytest.mark.parametrize(
    ("accountant", "target", "steps"),
    [("rdp", 2.0, 500), ("rdp", 0.5, 1000), ("prv", 2.0, 200), ("pld", 1.0, 40)],
)
def test_noise_for_target_epsilon_round_trip(
    accountant: AccountantName, target: float, steps: int
) -> None:
    noise = noise_for_target_epsilon(
        target_epsilon=target,
        sample_rate=0.01,
        steps=steps,
        delta=DELTA,
        accountant=accountant,
    )
    history = [DPSteps(noise_multiplier=noise, sample_rate=0.01, steps=steps)]
    reached = compute_epsilon(history=history, delta=DELTA, accountant=accountant)
    assert target - 0.01 <= reached <= target


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_noise_for_target_epsilon_agrees_with_opacus() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    ours = noise_for_target_epsilon(
        target_epsilon=4.0, sample_rate=0.02, steps=800, delta=DELTA, accountant="rdp"
    )
    theirs = get_noise_multiplier(
        target_epsilon=4.0, target_delta=DELTA, sample_rate=0.02, steps=800, accountant="rdp"
    )
    assert ours == pytest.approx(theirs, rel=0.02)


def test_noise_for_target_epsilon_refuses_zero_steps() -> None:
    with pytest.raises(PrivacyError, match="0 steps"):
        noise_for_target_epsilon(
            target_epsilon=1.0, sample_rate=0.01, steps=0, delta=DELTA, accountant="rdp"
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0.0}, "sample rate must be in"),
        ({"sample_rate": 1.5}, "sample rate must be in"),
        ({"sample_rate": math.nan}, "sample rate must be in"),
        ({"noise_multiplier": 0.0}, "noise multiplier must be"),
        ({"noise_multiplier": -1.0}, "noise multiplier must be"),
        ({"noise_multiplier": math.inf}, "noise multiplier must be"),
        ({"steps": -1}, "steps must be an integer"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
    ],
)
def test_bad_steps_are_refused(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10}
    values.update(kwargs)
    with pytest.raises(PrivacyError, match=message) as caught:
        DPSteps(**values)  # type: ignore[arg-type]
    assert caught.value.hint


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta_is_refused(delta: float) -> None:
    with pytest.raises(PrivacyError, match="delta must be in"):
        compute_epsilon(history=[ROUND], delta=delta, accountant="rdp")


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(PrivacyError, match="unknown accountant 'gdp'") as caught:
        compute_epsilon(history=[ROUND], delta=DELTA, accountant="gdp")  # type: ignore[arg-type]
    assert "rdp" in (caught.value.hint or "")


def test_importing_the_package_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, medfed.privacy, medfed.cli.privacy_cmd\n"
        "heavy = ['torch', 'opacus', 'dp_accounting', 'monai', 'nibabel', 'scipy', 'medfed.site']\n"
        "print(','.join(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def _fresh_rdp_epsilon(history: list[DPSteps], delta: float) -> float:
    """Opacus' RDP epsilon computed from scratch, as compute_epsilon did before it memoised."""
    import numpy as np
    from opacus.accountants.analysis import rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = list(np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float))
    totals: dict[tuple[float, float], int] = {}
    for entry in history:
        key = (entry.noise_multiplier, entry.sample_rate)
        totals[key] = totals.get(key, 0) + entry.steps
    curve = sum(
        rdp.compute_rdp(q=rate, noise_multiplier=noise, steps=steps, orders=orders)
        for (noise, rate), steps in totals.items()
    )
    epsilon, _ = rdp.get_privacy_spent(orders=orders, rdp=np.asarray(curve), delta=delta)
    return float(epsilon)


def test_each_distinct_history_is_computed_once_per_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medfed.privacy import accounting

    computed: list[tuple[tuple[float, float, int], ...]] = []
    method = accounting._METHODS["rdp-classic"]

    def counted(merged: list[tuple[float, float, int]], delta: float) -> float:
        computed.append(tuple(merged))
        return method(merged, delta)

    monkeypatch.setitem(accounting._METHODS, "rdp-classic", counted)  # type: ignore[index]
    accounting._cached_epsilon.cache_clear()
    # Twelve sites in three groups that share settings, each checked in five rounds.
    histories = [
        [DPSteps(noise_multiplier=noise, sample_rate=0.02, steps=40)] * 3
        for noise in (0.9, 1.1, 1.4)
    ]
    seen = [
        compute_epsilon(history=list(histories[site % 3]), delta=DELTA, accountant="rdp-classic")
        for _ in range(5)
        for site in range(12)
    ]
    assert len(computed) == 3
    assert accounting._cached_epsilon.cache_info().hits == 5 * 12 - 3
    for site, value in enumerate(seen[:12]):
        assert value == method(list(computed[site % 3]), DELTA)  # to the bit
    assert seen[12:] == seen[:12] * 4


def test_a_growing_history_reuses_its_one_step_curve_to_the_bit() -> None:
    from medfed.privacy import accounting

    accounting._rdp_per_step.cache_clear()
    history: list[DPSteps] = []
    for round_index in range(8):
        history.append(ROUND)
        if round_index % 3 == 0:
            history.append(DPSteps(noise_multiplier=1.3, sample_rate=0.02, steps=17 + round_index))
        ours = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
        assert ours == _fresh_rdp_epsilon(history, DELTA)
    # Two settings, each one-step curve computed once; every later round only scales them.
    assert accounting._rdp_per_step.cache_info().misses == 2
