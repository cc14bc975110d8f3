"""Local DP training end to end: real NIfTI files, real MONAI network, real Opacus, real ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medfed.config import SiteConfig, load_site_config
from medfed.data import synthesize_site
from medfed.errors import BudgetExceededError, LedgerError, PrivacyUnitError
from medfed.privacy import DPSteps, SiteLedger, compute_epsilon
from medfed.site import dp as dp_module
from medfed.site.trainer import train_local

pytestmark = pytest.mark.slow


def _site(
    tmp_path: Path, *, cases: int = 24, size: int = 32, seed: int = 0, **privacy: float
) -> SiteConfig:
    synthesize_site(out=tmp_path / "site", cases=cases, size=size, seed=seed)
    config = load_site_config(tmp_path / "site" / "site.yaml")
    if privacy:
        config = config.model_copy(update={"privacy": config.privacy.model_copy(update=privacy)})
    return config


def _ledger(config: SiteConfig) -> SiteLedger:
    return SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )


def test_dp_training_within_the_default_budget_learns_and_records_its_cost(
    tmp_path: Path,
) -> None:
    # The synthetic site exactly as `medfed data synth` writes it (the README's main job).
    config = _site(tmp_path, cases=40, size=32)
    result = train_local(config=config)

    # It learns: validation Dice clearly above the untrained network's (about 0.03). DP noise
    # comes from OS entropy, so the result varies: eight runs gave 0.54-0.67.
    assert result.dice_after > result.dice_before + 0.3, result
    assert result.dice_after > 0.4, result

    # The ledger holds its terms, the released patient counts (public: synthetic data), one
    # reservation and its commit; it verifies, and epsilon is recomputed from it; one default
    # run spends 90% of the cap and no more.
    ledger = _ledger(config)
    kinds = [type(entry).__name__ for entry in ledger.verify().entries]
    assert kinds == ["TermsEntry", "ReleaseEntry", "ReserveEntry", "CommitEntry"]
    history = ledger.history()
    assert history == [
        DPSteps(
            noise_multiplier=result.noise_multiplier,
            sample_rate=result.sample_rate,
            steps=result.steps,
        )
    ]
    expected = compute_epsilon(history=history, delta=config.privacy.delta, accountant="rdp")
    assert result.epsilon_spent == pytest.approx(expected, rel=1e-12)
    assert result.epochs[-1].epsilon == pytest.approx(expected, rel=1e-12)
    assert 0.85 * config.privacy.epsilon_cap < result.epsilon_spent <= config.privacy.epsilon_cap

    # Checkpoint and metrics are on disk and plain.
    metrics = json.loads(result.metrics_file.read_text())
    assert metrics["dice_after"] == pytest.approx(result.dice_after)
    assert (result.checkpoint / "model.safetensors").is_file()

    # A second run would pass the cap: refused before any step, nothing written.
    before = config.ledger_path.read_bytes()
    with pytest.raises(BudgetExceededError):
        train_local(config=config, round_index=1)
    assert config.ledger_path.read_bytes() == before


def test_rounds_compose_in_one_history(tmp_path: Path) -> None:
    config = _site(tmp_path, cases=10, size=16, epsilon_cap=100.0)
    first = train_local(config=config, epochs=2)
    second = train_local(config=config, epochs=2, run_id=first.run_id, round_index=1)
    ledger = _ledger(config)
    history = ledger.history()
    # terms, counts, and two rounds of reserve and commit: the counts are released once
    assert len(history) == 2 and len(ledger.verify().entries) == 6
    composed = compute_epsilon(history=history, delta=config.privacy.delta, accountant="rdp")
    assert second.epsilon_spent == pytest.approx(composed, rel=1e-12)
    alone = compute_epsilon(history=history[1:], delta=config.privacy.delta, accountant="rdp")
    # Never reset (more than the first round alone), never summed (less than the sum).
    assert first.epsilon_spent < composed < first.epsilon_spent + alone


def test_a_round_past_the_cap_is_refused_and_spends_nothing(tmp_path: Path) -> None:
    config = _site(tmp_path, cases=8, size=16, epsilon_cap=0.5)
    with pytest.raises(BudgetExceededError):
        train_local(config=config, epochs=1)
    assert not config.ledger_path.exists() or _ledger(config).history() == []
    assert not (config.paths.workdir / "checkpoints").exists()


def test_a_tampered_ledger_stops_the_site_naming_the_entry(tmp_path: Path) -> None:
    config = _site(tmp_path, cases=8, size=16)
    train_local(config=config, epochs=1)
    lines = config.ledger_path.read_text().splitlines()
    reserve = json.loads(lines[2])
    reserve["noise_multiplier"] *= 2  # an edit that would halve the recorded privacy cost
    lines[2] = json.dumps(reserve, sort_keys=True, separators=(",", ":"))
    config.ledger_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=r"line 3 \(seq 2\)"):
        train_local(config=config, epochs=1)


def test_every_step_gets_exactly_one_clipped_gradient_per_sampled_patient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts per-sample gradient rows against sampled patients in a real training run.

    If a pipeline change (several crops per patient, sampling with replacement, a flattened
    multi-sample dataset) let one patient contribute more than one clipped gradient, the rows
    would outnumber the distinct patients and this test would fail.
    """
    config = _site(tmp_path, cases=10, size=16, epsilon_cap=100.0)
    seen: list[tuple[int, int, int]] = []
    real_rows = dp_module.per_sample_gradient_rows
    real_draw = dp_module.PoissonPatientSampler.draw
    drawn: list[list[int]] = []

    def draw(self: dp_module.PoissonPatientSampler) -> list[int]:
        patients = real_draw(self)
        drawn.append(patients)
        return patients

    def rows(module: torch.nn.Module) -> int:
        count = real_rows(module)
        seen.append((count, len(drawn[-1]), len(set(drawn[-1]))))
        return count

    monkeypatch.setattr(dp_module.PoissonPatientSampler, "draw", draw)
    monkeypatch.setattr("medfed.site.dp.per_sample_gradient_rows", rows)
    result = train_local(config=config, epochs=3)
    assert len(drawn) == result.steps
    assert seen, "no non-empty step was taken"
    assert all(count == sampled == distinct for count, sampled, distinct in seen), seen


def test_a_dataset_that_lists_each_patient_twice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "flattened" multi-crop pipeline: every patient appears as two examples."""
    from medfed.data.dataset import PatientDataset

    config = _site(tmp_path, cases=8, size=16, epsilon_cap=100.0)
    # Sampling rate 1: every example is drawn, so both copies of a patient meet in one batch.
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"batch_size": 1000})}
    )
    original = PatientDataset.__getitem__
    monkeypatch.setattr(PatientDataset, "__len__", lambda self: 2 * len(self.cases))
    monkeypatch.setattr(
        PatientDataset, "__getitem__", lambda self, i: original(self, int(i) % len(self.cases))
    )
    with pytest.raises(PrivacyUnitError, match="distinct patients"):
        train_local(config=config, epochs=1)
    # The refusal came before any noisy update left the loop: the commit records zero steps.
    assert _ledger(config).history()[0].steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_learns_and_records_the_same_ledger(tmp_path: Path) -> None:
    config = _site(tmp_path, cases=40, size=32)
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"device": "cuda"})}
    )
    result = train_local(config=config)
    assert result.dice_after > result.dice_before + 0.3, result
    assert len(_ledger(config).verify().entries) == 4


def test_secure_mode_and_a_target_epsilon_per_round(tmp_path: Path) -> None:
    config = _site(tmp_path, cases=8, size=16)
    privacy = config.privacy.model_dump() | {
        "noise_multiplier": None,
        "target_epsilon_per_round": 1.5,
        "secure_mode": True,
    }
    config = config.model_copy(update={"privacy": type(config.privacy).model_validate(privacy)})
    result = train_local(config=config, epochs=2)
    # Sigma was calibrated so that this round alone stays within its target.
    alone = compute_epsilon(
        history=[
            DPSteps(
                noise_multiplier=result.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
        ],
        delta=config.privacy.delta,
        accountant="rdp",
    )
    assert 1.4 < alone <= 1.5
    assert result.epsilon_spent == pytest.approx(alone, rel=1e-12)
