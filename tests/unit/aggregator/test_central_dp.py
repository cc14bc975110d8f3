"""Site-level central DP at the aggregator: clipping, the noise, the ledger and its epsilon."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from medfed.aggregator.central_dp import (
    CentralDPAggregation,
    check_central_dp,
    clip_update,
    round_aggregation,
    site_level_event,
)
from medfed.aggregator.site_level_ledger import SiteLevelLedger
from medfed.aggregator.strategies import FedAdam, RoundAggregation
from medfed.config.strategy import StrategySettings
from medfed.csprng import csprng_normals
from medfed.errors import AggregationError, ConfigError, LedgerError
from medfed.privacy.accounting import DPSteps, compute_epsilon
from medfed.types import SiteUpdate

DP = {"noise_multiplier": 1.5, "clip_norm": 0.5}


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "norm.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _update(site: str, base: dict[str, np.ndarray], shift: float, seed: int) -> SiteUpdate:
    rng = np.random.default_rng(seed)
    weights = {
        name: (a + shift * rng.standard_normal(a.shape)).astype(np.float32)
        if a.dtype.kind == "f"
        else np.array(a + 100)
        for name, a in base.items()
    }
    return SiteUpdate(site_id=site, round=1, weights=weights, num_patients=10 * seed + 1)


def _zeros(count: int, *, std: float) -> np.ndarray:
    return np.zeros(count)


def _aggregation(tmp_path: Path, settings: StrategySettings, cohort: int, **kw: Any) -> Any:
    return CentralDPAggregation(
        settings=settings,
        global_weights=_global(),
        cohort=cohort,
        ledger=SiteLevelLedger(path=tmp_path / "site_level_ledger.jsonl"),
        run_name="study",
        round=1,
        **kw,
    )


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values()))


def test_clipping_scales_a_large_delta_to_the_norm_and_keeps_its_direction() -> None:
    base = _global()
    update = _update("a", base, shift=3.0, seed=1)
    clipped, norm = clip_update(weights=update.weights, global_weights=base, clip_norm=0.5)
    assert sorted(clipped) == ["conv.bias", "conv.weight"]  # counters are not deltas
    raw = {k: update.weights[k].astype(np.float64) - base[k] for k in clipped}
    assert norm == pytest.approx(_norm(raw), rel=1e-12) and norm > 10
    assert _norm(clipped) <= 0.5
    assert _norm(clipped) == pytest.approx(0.5, rel=1e-6)
    for name, value in clipped.items():
        np.testing.assert_allclose(value, raw[name] * 0.5 / norm, rtol=1e-5, atol=1e-8)


def test_clipping_leaves_a_small_delta_as_it_is() -> None:
    base = _global()
    update = _update("a", base, shift=1e-3, seed=2)
    clipped, norm = clip_update(weights=update.weights, global_weights=base, clip_norm=0.5)
    assert norm < 0.5
    for name, value in clipped.items():
        expected = (update.weights[name].astype(np.float64) - base[name]).astype(np.float32)
        np.testing.assert_array_equal(value, expected)


def test_the_mean_has_equal_weights_and_a_fixed_denominator(tmp_path: Path) -> None:
    # Three sites asked, two answered: the clipped deltas are summed and divided by 3, whatever
    # the patient counts; counters stay the global model's.
    base = _global()
    settings = StrategySettings(central_dp=DP)
    aggregation = _aggregation(tmp_path, settings, cohort=3, noise=_zeros)
    updates = [_update("a", base, 3.0, 1), _update("b", base, 1e-3, 2)]
    for update in updates:
        aggregation.add(update=update)
    result = aggregation.finish(state=None)
    deltas = [
        clip_update(weights=u.weights, global_weights=base, clip_norm=0.5)[0] for u in updates
    ]
    for name in ("conv.weight", "conv.bias"):
        expected = base[name] + (deltas[0][name] + deltas[1][name]) / 3
        np.testing.assert_allclose(result.weights[name], expected, rtol=1e-6, atol=1e-7)
    assert result.weights["norm.num_batches_tracked"] == 7
    assert aggregation.clipped == 1 and aggregation.sites == ("a", "b")


def test_fedadam_steps_on_the_noisy_mean(tmp_path: Path) -> None:
    base = _global()
    settings = StrategySettings(name="fedadam", server_lr=0.05, central_dp=DP)
    aggregation = _aggregation(tmp_path, settings, cohort=2, noise=_zeros)
    updates = [_update("a", base, 0.2, 1), _update("b", base, 0.2, 2)]
    for update in updates:
        aggregation.add(update=update)
    result = aggregation.finish(state=None)
    plain = _aggregation(tmp_path / "plain", StrategySettings(central_dp=DP), 2, noise=_zeros)
    for update in updates:
        plain.add(update=update)
    mean = plain.finish(state=None).weights
    floating = ("conv.weight", "conv.bias")
    expected, state = FedAdam.from_settings(settings).step_to(
        state=None,
        global_weights={k: base[k] for k in floating},
        average={k: mean[k] for k in floating},
    )
    assert result.weights["norm.num_batches_tracked"] == 7
    for name, value in expected.items():
        np.testing.assert_array_equal(result.weights[name], value)
    assert result.state is not None and result.state.step == state.step == 1


@pytest.mark.parametrize("central_dp", [None, DP])
def test_a_rounds_aggregation_steps_at_its_scheduled_server_rate(
    tmp_path: Path, central_dp: dict[str, float] | None
) -> None:
    base = _global()
    settings = StrategySettings(
        name="fedadam", server_lr=0.05, server_lr_schedule="cosine", central_dp=central_dp
    )
    floating = ("conv.weight", "conv.bias")
    moves = []
    for round_index in (1, 10):
        aggregation = round_aggregation(
            settings=settings,
            global_weights=base,
            cohort=2,
            ledger=SiteLevelLedger(path=tmp_path / f"ledger-{round_index}.jsonl"),
            run_name="study",
            round=round_index,
            rounds=10,
        )
        if central_dp is not None:
            aggregation._noise = _zeros  # the step's size, not the noise, is under test
        for update in (_update("a", base, 0.2, 1), _update("b", base, 0.2, 2)):
            aggregation.add(update=update)
        weights = aggregation.finish(state=None).weights
        moves.append(np.concatenate([(weights[k] - base[k]).ravel() for k in floating]))
    # the same first step, at a tenth of the rate in the run's last round
    np.testing.assert_allclose(moves[1], moves[0] / 10, rtol=1e-4, atol=1e-7)


def test_the_noise_has_the_standard_deviation_of_the_mechanism(tmp_path: Path) -> None:
    # Every site returns the global model: what the aggregate moves is the noise alone, whose
    # standard deviation must be z * C / cohort on every coordinate.
    size = 200_000
    base = {"w": np.zeros(size, dtype=np.float32)}
    settings = StrategySettings(central_dp={"noise_multiplier": 2.0, "clip_norm": 0.6})
    aggregation = CentralDPAggregation(
        settings=settings,
        global_weights=base,
        cohort=4,
        ledger=SiteLevelLedger(path=tmp_path / "ledger.jsonl"),
        run_name="study",
        round=1,
    )
    for site in "abc":
        aggregation.add(update=SiteUpdate(site_id=site, round=1, weights=base, num_patients=3))
    noise = aggregation.finish(state=None).weights["w"].astype(np.float64)
    std = 2.0 * 0.6 / 4
    # The sample standard deviation of n normals is within 4 / sqrt(2n) of sigma (relative)
    # with probability far beyond 1 - 1e-4; the mean within 4 sigma / sqrt(n).
    assert abs(noise.std() / std - 1) < 4 / math.sqrt(2 * size)
    assert abs(noise.mean()) < 4 * std / math.sqrt(size)
    kurtosis = float(np.mean(((noise - noise.mean()) / noise.std()) ** 4))
    assert abs(kurtosis - 3) < 0.1  # Gaussian tails, not uniform (1.8) or Laplace (6)


def test_csprng_noise_is_fresh_every_call() -> None:
    first, second = csprng_normals(1000, std=1.0), csprng_normals(1000, std=1.0)
    assert not np.array_equal(first, second)
    assert np.all(csprng_normals(10, std=0.0) == 0)
    with pytest.raises(ValueError):
        csprng_normals(3, std=-1.0)


def test_each_round_is_recorded_before_its_noise_and_accounted_as_one_gaussian(
    tmp_path: Path,
) -> None:
    ledger = SiteLevelLedger(path=tmp_path / "ledger.jsonl")
    base = _global()
    settings = StrategySettings(central_dp={"noise_multiplier": 1.0, "clip_norm": 0.5})

    def broken(count: int, *, std: float) -> np.ndarray:
        raise RuntimeError("the noise source failed")

    for round_index in range(1, 11):
        aggregation = CentralDPAggregation(
            settings=settings,
            global_weights=base,
            cohort=3,
            ledger=ledger,
            run_name="study",
            round=round_index,
            noise=broken if round_index == 10 else csprng_normals,
        )
        aggregation.add(update=_update("a", base, 0.1, round_index))
        if round_index == 10:
            with pytest.raises(RuntimeError):
                aggregation.finish(state=None)
        else:
            aggregation.finish(state=None)
    entries = ledger.entries()
    # the tenth entry was written although its noise never came: a crash over-counts
    assert [e.round for e in entries] == list(range(1, 11))
    assert {(e.noise_multiplier, e.sample_rate, e.cohort) for e in entries} == {(1.0, 1.0, 3)}
    epsilon = ledger.epsilon(delta=1e-5)
    # Ten unsampled Gaussian mechanisms at z = 1: Opacus RDP and dp-accounting's
    # RdpAccountant (GaussianDpEvent composed 10 times) both give this value.
    assert epsilon == pytest.approx(19.05359753163139, rel=1e-12)
    history = [DPSteps(noise_multiplier=1.0, sample_rate=1.0, steps=10)]
    assert epsilon == compute_epsilon(history=history, delta=1e-5, accountant="rdp")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    reference = RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    assert epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    event = site_level_event(ledger=ledger, settings=settings, run_name="study", round=10, cohort=3)
    assert event.site_level_epsilon == pytest.approx(epsilon)
    assert (event.delta, event.releases, event.kind) == (1e-5, 10, "site_level_privacy")
    summary = ledger.summary(delta=1e-5)
    assert summary["unit"] == "site" and summary["site_level_epsilon"] == epsilon


def test_an_edited_site_level_ledger_is_refused(tmp_path: Path) -> None:
    ledger = SiteLevelLedger(path=tmp_path / "ledger.jsonl")
    for round_index in (1, 2, 3):
        ledger.append(
            run_name="study",
            round=round_index,
            noise_multiplier=1.0,
            clip_norm=0.5,
            sample_rate=1.0,
            cohort=3,
        )
    lines = ledger.path.read_bytes().splitlines()
    ledger.path.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")  # a round dropped
    with pytest.raises(LedgerError, match="not the next link"):
        ledger.entries()
    ledger.path.write_bytes(
        b"\n".join(lines).replace(b'"noise_multiplier":1.0', b'"noise_multiplier":9.0') + b"\n"
    )
    with pytest.raises(LedgerError):
        ledger.entries()


def test_robust_strategies_secure_aggregation_and_large_deltas_are_refused(
    tmp_path: Path,
) -> None:
    for name in ("median", "trimmed_mean"):
        with pytest.raises(ValidationError, match="central_dp cannot be combined"):
            StrategySettings(name=name, central_dp=DP)
    settings = StrategySettings(central_dp={**DP, "delta": 0.4})
    with pytest.raises(ConfigError, match="not below 1 / 3 sites"):
        check_central_dp(settings=settings, sites=3, secure_aggregation=False)
    check_central_dp(settings=settings, sites=2, secure_aggregation=False)
    with pytest.raises(ConfigError, match="secure aggregation"):
        check_central_dp(settings=StrategySettings(central_dp=DP), sites=3, secure_aggregation=True)
    median = StrategySettings(name="median").model_copy(
        update={"central_dp": StrategySettings(central_dp=DP).central_dp}
    )
    with pytest.raises(ConfigError):
        _aggregation(tmp_path, median, cohort=3)
    with pytest.raises(ConfigError):
        check_central_dp(settings=median, sites=3, secure_aggregation=False)


def test_round_aggregation_wraps_only_when_central_dp_is_asked(tmp_path: Path) -> None:
    base = _global()
    plain = round_aggregation(
        settings=StrategySettings(),
        global_weights=base,
        cohort=3,
        ledger=None,
        run_name="study",
        round=1,
        rounds=1,
    )
    assert type(plain) is RoundAggregation
    with pytest.raises(ConfigError, match="site-level ledger"):
        round_aggregation(
            settings=StrategySettings(central_dp=DP),
            global_weights=base,
            cohort=3,
            ledger=None,
            run_name="study",
            round=1,
            rounds=1,
        )
    aggregation = _aggregation(tmp_path, StrategySettings(central_dp=DP), cohort=1)
    aggregation.add(update=_update("a", base, 0.1, 1))
    with pytest.raises(AggregationError, match="more updates than the 1 sites"):
        aggregation.add(update=_update("b", base, 0.1, 2))
    empty = _aggregation(tmp_path, StrategySettings(central_dp=DP), cohort=2)
    with pytest.raises(AggregationError, match="no site updates"):
        empty.finish(state=None)
    assert not (tmp_path / "site_level_ledger.jsonl").exists()  # nothing released, nothing spent


def test_site_level_epsilon_is_shown_apart_in_mlflow_lines_and_the_final_table() -> None:
    from rich.console import Console

    from medfed.api.progress import event_line
    from medfed.cli.progress import print_summary
    from medfed.run_events import RunStarted, SiteLevelPrivacy, parse_event
    from medfed.tracking.operations import Translator

    event = SiteLevelPrivacy(
        run_name="study", round=3, site_level_epsilon=12.5, delta=1e-5, releases=3, cohort=3
    )
    assert parse_event(event.to_json()) == event
    translator = Translator()
    translator.operations(RunStarted(run_name="study", sites=("a",), settings={}))
    (operation,) = translator.operations(event)
    assert operation["key"] == translator.parent_key
    assert [m[0] for m in operation["metrics"]] == ["site_level_epsilon"]
    assert operation["metrics"][0][1] == 12.5 and operation["metrics"][0][3] == 3
    tags = dict(operation["tags"])
    assert tags["medfed.site_level_delta"] == "1e-05" and "site" in tags["medfed.site_level_unit"]
    line = event_line(event)
    assert line is not None and "site-level epsilon" in line and "not a patient" in line
    summary = {
        "run_name": "study",
        "status": "finished",
        "rounds_completed": 3,
        "sites": [
            {
                "site_id": "a",
                "status": "active",
                "rounds": 3,
                "patients": 19,
                "dice": 0.7,
                "epsilon_spent": 2.0,
                "epsilon_cap": 8.0,
                "delta": 1e-5,
            }
        ],
        "site_level_privacy": {"site_level_epsilon": 12.5, "delta": 1e-5, "releases": 3},
    }
    console = Console(record=True, width=200)
    print_summary(console, summary)
    text = console.export_text()
    assert "site-level epsilon (central DP at the aggregator" in text and "12.50" in text
