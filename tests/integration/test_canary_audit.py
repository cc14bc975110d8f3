"""The canary audit end to end: real synthetic canaries, the site's real network, real Opacus,
the trainer's own DP step and a real ledger; bugs injected into that path are caught.

The DP noise and the Poisson draws come from ``os.urandom``; each test replaces it with a
seeded stream so that its numbers are the same on every run. Over five other streams an
honest run's bound for its claim of 2 was 0.11-0.76, and a broken one's 3.95 (all 250 guesses
right, the most 500 canaries can show); the tests ask for below 1 and above 3.3.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import medfed.cli.app
from medfed.cli.canary_cmd import canary
from medfed.config import SiteConfig
from medfed.config.loading import dump_site_config
from medfed.errors import ConfigError, PrivacyAuditViolation
from medfed.privacy import DPSteps, SiteLedger, compute_epsilon, public_key_path
from medfed.site import epochs
from medfed.site.canary_audit import CanaryAuditResult, run_canary_audit
from medfed.site.dp import PoissonPatientSampler
from medfed.site.noise import CsprngDPOptimizer

pytestmark = pytest.mark.slow

CANARIES = 500
HEADLINE = [
    "claimed_epsilon",
    "empirical_epsilon_lower_bound",
    "confidence",
    "canaries",
    "violated",
]


def _site(tmp_path: Path, **training: Any) -> SiteConfig:
    """The smallest 2-D UNet the factory builds (580 parameters), on a site whose manifest does
    not exist: an audit that read patient data would fail."""
    return SiteConfig.model_validate(
        {
            "site_id": "site-a",
            "data": {
                "manifest": str(tmp_path / "patients" / "manifest.csv"),
                "patch_size": [16, 16],
            },
            "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
            "training": {
                "epochs": 5,
                "batch_size": 4,
                "device": "cpu",
                "threads": 1,
                "seed": 0,
                **training,
            },
            "paths": {"workdir": str(tmp_path / "work")},
        }
    )


@pytest.fixture
def entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.urandom`` as a seeded stream: the run's noise and sampling become reproducible."""
    monkeypatch.setattr(os, "urandom", random.Random(1000).randbytes)


def _audit(config: SiteConfig, **options: Any) -> CanaryAuditResult:
    return run_canary_audit(
        config=config, canaries=options.pop("canaries", CANARIES), seed=0, **options
    )


def _cli(config: SiteConfig, tmp_path: Path, *args: str) -> Any:
    """`canary` as `medfed audit canary` registers it, run like the real command line."""
    path = tmp_path / "site.yaml"
    dump_site_config(config, path)
    app = typer.Typer()
    app.command("canary")(canary)
    app.command("unused")(lambda: None)  # keeps "canary" a subcommand, as under `medfed audit`
    return CliRunner().invoke(app, ["canary", "--config", str(path), *args])


def test_an_honest_run_is_not_flagged_and_keeps_to_itself(tmp_path: Path, entropy: None) -> None:
    config = _site(tmp_path)
    result = _cli(config, tmp_path, "--canaries", str(CANARIES), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert list(document)[:5] == HEADLINE
    assert 1.9 < document["claimed_epsilon"] <= 2.0
    assert document["empirical_epsilon_lower_bound"] < 1.0  # far below the claim
    assert document["violated"] is False
    assert (document["confidence"], document["canaries"]) == (0.95, CANARIES)
    assert document["correct"] <= document["guesses"] <= CANARIES
    assert 200 < document["included_canaries"] < 300
    assert "violated: false" in result.output

    # The result is also kept in the site's workdir, as the same document.
    audit_dir = config.paths.workdir / "audit"
    (kept,) = audit_dir.glob("canary-*.json")
    assert json.loads(kept.read_text()) == document

    # The claim is the audit ledger's own epsilon: its plan, verified under its public key
    # alone (the private key is gone), recomputed with the site's accountant.
    ledger_path = Path(document["ledger"])
    assert ledger_path.parent.parent == audit_dir
    key = ledger_path.parent / "keys" / "audit_ed25519.pem"
    assert not key.exists() and public_key_path(key).exists()
    ledger = SiteLedger(path=ledger_path, key_path=key, site_id="site-a")
    history = ledger.history()
    assert history == [
        DPSteps(
            noise_multiplier=document["noise_multiplier"],
            sample_rate=document["sample_rate"],
            steps=document["steps"],
        )
    ]
    assert document["sample_rate"] == pytest.approx(4 / 250)
    assert document["steps"] == 5 * 62
    epsilon = compute_epsilon(history=history, delta=1e-5, accountant="rdp")
    assert document["claimed_epsilon"] == pytest.approx(epsilon, rel=1e-12)

    # Nothing of the site was read or touched: no site ledger, no cache, no scratch canaries.
    assert not config.ledger_path.exists() and not config.signing_key_path.exists()
    assert sorted(p.name for p in config.paths.workdir.iterdir()) == ["audit"]
    assert sorted(p.name for p in audit_dir.iterdir()) == [kept.stem, kept.name]


def test_noise_removed_after_the_ledger_recorded_it_is_flagged(
    tmp_path: Path, entropy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train = epochs.train_epochs

    def noiseless(**kwargs: Any) -> Any:
        kwargs["dp"].optimizer.noise_multiplier = 0.0  # the reservation is already written
        return real_train(**kwargs)

    monkeypatch.setattr(epochs, "train_epochs", noiseless)
    config = _site(tmp_path)
    result = _cli(config, tmp_path, "--canaries", str(CANARIES), "--json", str(tmp_path / "r.json"))
    assert isinstance(result.exception, PrivacyAuditViolation), result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert 1.9 < document["claimed_epsilon"] <= 2.0
    assert document["empirical_epsilon_lower_bound"] > 3.3
    assert document["violated"] is True
    assert "violated: true" in result.output
    assert result.exception.exit_code == 21
    assert result.exception.one_line().startswith(
        "error[privacy-audit-violated]: site site-a: the canary audit proves epsilon above 3."
    )


def test_clipping_disabled_is_flagged(
    tmp_path: Path, entropy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_clip = CsprngDPOptimizer.clip_and_accumulate

    def unclipped(self: CsprngDPOptimizer) -> None:
        # Per-sample gradients summed as they are; the noise stays calibrated to the norm.
        norm = self.max_grad_norm
        self.max_grad_norm = math.inf
        try:
            real_clip(self)
        finally:
            self.max_grad_norm = norm

    monkeypatch.setattr(CsprngDPOptimizer, "clip_and_accumulate", unclipped)
    result = _audit(_site(tmp_path))
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.bound.epsilon > 3.3 and result.violated


def test_a_sample_rate_under_reported_in_the_ledger_is_flagged(
    tmp_path: Path, entropy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_init = PoissonPatientSampler.__init__

    def tenfold(self: PoissonPatientSampler, *, num_patients: int, sample_rate: float) -> None:
        # The ledger records the planned rate; the sampler draws ten times as often.
        real_init(self, num_patients=num_patients, sample_rate=min(1.0, 10 * sample_rate))

    monkeypatch.setattr(PoissonPatientSampler, "__init__", tenfold)
    result = _audit(_site(tmp_path))
    recorded = SiteLedger(
        path=result.ledger,
        key_path=result.ledger.parent / "keys" / "audit_ed25519.pem",
        site_id="site-a",
    ).history()
    assert [entry.sample_rate for entry in recorded] == [pytest.approx(4 / 250)]
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.bound.epsilon > 3.3 and result.violated


def test_the_black_box_loss_score_trains_the_canaries_and_stays_honest(
    tmp_path: Path, entropy: None
) -> None:
    config = _site(tmp_path, epochs=3)
    result = _audit(config, canaries=100, score="loss", epsilon=1.5)
    assert result.score == "loss"
    assert 1.4 < result.claimed_epsilon <= 1.5
    assert result.bound.epsilon < 0.5 and not result.violated
    assert result.steps == 3 * 12
    assert result.result_file.is_file()


def test_the_audit_draws_at_the_sample_rate_the_site_sets(tmp_path: Path, entropy: None) -> None:
    # training.sample_rate is the rate of the site's every round, so the audit's too
    config = _site(tmp_path, epochs=2, sample_rate=0.1)
    result = _audit(config, canaries=100, score="loss", epsilon=1.5)
    assert (result.plan.sample_rate, result.steps) == (0.1, 2 * 10)
    history = SiteLedger(
        path=result.ledger,
        key_path=result.ledger.parent / "keys" / "audit_ed25519.pem",
        site_id="site-a",
    ).history()
    assert [(entry.sample_rate, entry.steps) for entry in history] == [(0.1, 20)]
    assert 1.4 < result.claimed_epsilon <= 1.5


def test_an_audit_that_could_not_flag_anything_is_refused_before_training(
    tmp_path: Path,
) -> None:
    config = _site(tmp_path)
    with pytest.raises(ConfigError, match="20 canaries can prove at most epsilon"):
        _audit(config, canaries=20)
    with pytest.raises(ConfigError, match="at least 10 canaries"):
        _audit(config, canaries=5)
    assert not config.paths.workdir.exists()


def test_more_gradient_canaries_than_parameters_are_refused(tmp_path: Path) -> None:
    config = _site(tmp_path)
    with pytest.raises(ConfigError, match="the site's network has 580 trainable ones"):
        _audit(config, canaries=1000)
    assert not config.paths.workdir.exists()


def test_user_mistakes_print_one_line_and_exit_with_their_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site.yaml"
    dump_site_config(_site(tmp_path), path)
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("canary")(canary)
    app.command("unused")(lambda: None)
    monkeypatch.setattr(medfed.cli.app, "app", app)
    monkeypatch.setattr("sys.argv", ["medfed", "canary", "--config", str(path), "--canaries", "20"])
    with pytest.raises(SystemExit) as exited:
        medfed.cli.app.main()
    assert exited.value.code == ConfigError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error[config]: 20 canaries can prove at most epsilon")


def test_the_result_document_is_stable() -> None:
    from medfed.privacy.one_run_audit import AuditBound
    from medfed.privacy.site_ledger import RoundPlan

    bound = AuditBound(
        epsilon=3.5,
        confidence=0.95,
        delta=1e-5,
        canaries=500,
        guesses=250,
        correct=250,
        guess_counts=(25, 50, 100, 250, 500),
    )
    plan = RoundPlan(
        run_id="canary-audit-x",
        round=0,
        planned_rounds=None,
        steps=310,
        sample_rate=0.016,
        noise_multiplier=1.02,
        max_grad_norm=1.0,
    )
    result = CanaryAuditResult(
        site_id="site-a",
        run_id="canary-audit-x",
        score="gradient",
        target_epsilon=2.0,
        claimed_epsilon=1.999,
        accountant="rdp",
        bound=bound,
        included=251,
        plan=plan,
        steps=310,
        ledger=Path("/w/audit/canary-x/ledger.jsonl"),
        result_file=Path("/w/audit/canary-x.json"),
        created="2025-01-01T00:00:00+00:00",
        seconds=9.5,
    )
    document = result.to_json()
    assert list(document) == [
        *HEADLINE, "schema", "site_id", "run_id", "created", "score", "guesses", "correct",
        "guess_counts", "included_canaries", "target_epsilon", "delta", "accountant",
        "sample_rate", "noise_multiplier", "max_grad_norm", "steps", "ledger", "seconds",
        "reference",
    ]  # fmt: skip
    assert document["violated"] is True and document["schema"] == "medfed.canary-audit/1"
    assert json.loads(json.dumps(document)) == document
    assert not dataclasses.replace(result, claimed_epsilon=3.5).violated
