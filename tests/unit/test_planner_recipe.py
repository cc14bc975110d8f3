"""The planner's recipe: the cosine one-step preset planned for a federation's sizes and cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.api.measured_utility import MEASURED, MeasuredRatio, nearest_measurement
from medfed.api.planner import plan_epsilon, recommend_recipe
from medfed.cli.app import app
from medfed.config.run import RunSettings, parse_run_settings
from medfed.errors import PrivacyError
from medfed.privacy import DPSteps, compute_epsilon

runner = CliRunner()


def test_the_recipe_plans_full_batch_one_step_rounds_within_the_cap() -> None:
    recipe = recommend_recipe(patients_per_site=19, sites=3, target_epsilon=8.0)
    assert (recipe.preset, recipe.rounds, recipe.local_epochs) == ("dp-fedadam-cosine", 160, 1)
    assert (recipe.sample_rate, recipe.batch_size, recipe.steps_per_round) == (1.0, 19, 1)
    # 160 unsampled Gaussian steps, as the sites' ledgers will record them
    history = [DPSteps(noise_multiplier=recipe.noise_multiplier, sample_rate=1.0, steps=160)]
    spent = compute_epsilon(history=history, delta=1e-5, accountant="rdp")
    assert spent == pytest.approx(recipe.epsilon, rel=1e-12)
    assert 8.0 - 0.01 <= spent <= 8.0
    # benchmarks/README.md planned 8.07 (rounded up) for the same run
    assert recipe.noise_multiplier == pytest.approx(8.07, abs=0.01)
    # the run settings it prints are valid and expand to the preset
    settings = parse_run_settings({"run_name": "study", **recipe.run_settings})
    assert settings.strategy.name == "fedadam" and settings.rounds == 160
    assert settings.strategy.server_lr_schedule == "cosine"
    assert settings.noise_multiplier == recipe.noise_multiplier
    assert recipe.site_settings["training.optimizer"] == "sgd"


def test_fewer_rounds_need_less_noise_for_the_same_cap() -> None:
    long = recommend_recipe(patients_per_site=50, sites=5, target_epsilon=2.0)
    short = recommend_recipe(patients_per_site=50, sites=5, target_epsilon=2.0, rounds=20)
    assert short.rounds == 20 and short.noise_multiplier < long.noise_multiplier
    again = plan_epsilon(
        dataset_size=50,
        batch_size=50,
        epochs_per_round=1,
        rounds=20,
        noise_multiplier=short.noise_multiplier,
        delta=1e-5,
    )
    assert again == short.epsilon <= 2.0


def test_the_expected_ratio_is_the_nearest_measurement_and_says_how_near() -> None:
    near = recommend_recipe(patients_per_site=19, sites=3, target_epsilon=8.0)
    far = recommend_recipe(patients_per_site=1000, sites=10, target_epsilon=2.0)

    def row(recipe: str, patients: int, epsilon: float) -> MeasuredRatio:
        return next(
            m
            for m in MEASURED
            if (m.recipe, m.patients_per_site, m.epsilon) == (recipe, patients, epsilon)
        )

    nearest = [
        (near, row("dp-fedadam-cosine", 19, 8.0)),
        (far, row("dp-fedadam-one-step", 154, 2.0)),
    ]
    for recipe, measured in nearest:
        estimate = recipe.expected_dice_ratio
        assert estimate is not None
        assert (estimate.ratio, estimate.low, estimate.high) == (
            measured.ratio,
            measured.low,
            measured.high,
        )
        assert "benchmarks/README.md" in estimate.source
        assert estimate.note.startswith("an estimate")
    assert near.expected_dice_ratio is not None and far.expected_dice_ratio is not None
    assert near.expected_dice_ratio.distance == 0
    assert near.expected_dice_ratio.recipe == "dp-fedadam-cosine"
    assert "no measurement near" in far.expected_dice_ratio.note
    # measured with the constant-rate recipe only: the estimate says so
    assert far.expected_dice_ratio.recipe == "dp-fedadam-one-step"
    assert "earlier recipe dp-fedadam-one-step" in far.expected_dice_ratio.note
    assert nearest_measurement(patients_per_site=19, epsilon=8, recipe="other") is None


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(PrivacyError, match="patients_per_site"):
        recommend_recipe(patients_per_site=0, sites=3, target_epsilon=8.0)
    with pytest.raises(PrivacyError, match="sites"):
        recommend_recipe(patients_per_site=10, sites=0, target_epsilon=8.0)


def test_privacy_plan_prints_the_recipe_labelled_as_an_estimate() -> None:
    result = runner.invoke(
        app, ["privacy", "plan", "--patients", "19", "--sites", "3", "--epsilon", "8"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for text in (
        "dp-fedadam-cosine",
        "noise multiplier  8.06",
        "sample rate       1",
        "rounds            160",
        "local steps       1 per round",
        "expected Dice ratio (ESTIMATE",
        "0.84 (measured 0.73-0.89)",
        "source: benchmarks/README.md",
    ):
        assert text in out, text
    result = runner.invoke(
        app,
        [
            "privacy",
            "plan",
            "--patients",
            "40",
            "--sites",
            "4",
            "--epsilon",
            "3",
            "--rounds",
            "30",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["rounds"], data["sample_rate"], data["batch_size"]) == (30, 1.0, 40)
    # the nearest measurement: 38 training patients per site at epsilon 2
    assert data["epsilon"] <= 3.0 and data["expected_dice_ratio"]["estimate"] == 0.721
    assert data["expected_dice_ratio"]["recipe"] == "dp-fedadam-one-step"


def test_medfed_run_keeps_a_settings_file_preset_unless_a_flag_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.transport import deploy
    from medfed.transport import runner as transport_runner
    from medfed.transport.provision import provision_workspace

    workspace = tmp_path / "ws"
    provision_workspace(out=workspace, sites=["a", "b"], host="127.0.0.1", port=1)
    submitted: list[RunSettings] = []

    def submit(*, workspace: Path, settings: RunSettings) -> int:
        submitted.append(settings)
        return 1

    monkeypatch.setattr(deploy, "require_aggregator", lambda **_: None)
    monkeypatch.setattr(transport_runner, "submit", submit)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps({"strategy": {"preset": "dp-fedadam-one-step"}}))
    base = ["run", "--workspace", str(workspace), "--settings", str(settings_file), "--no-follow"]
    for extra in ([], ["--rounds", "20", "--strategy", "fedadam"]):
        result = runner.invoke(app, [*base, "--name", f"r{len(extra)}", *extra])
        assert result.exit_code == 0, result.output
    preset, overridden = submitted
    assert (preset.strategy.name, preset.strategy.server_lr) == ("fedadam", 0.05)
    assert (preset.rounds, preset.local_epochs, preset.learning_rate) == (80, 1, 1.0)
    assert (overridden.rounds, overridden.local_epochs) == (20, 1)
