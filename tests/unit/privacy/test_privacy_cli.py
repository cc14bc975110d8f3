"""`medfed privacy epsilon` and `medfed privacy ledger` through the real command line app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli.app import app, main
from medfed.errors import LedgerError, PrivacyError
from medfed.privacy import DPSteps, PrivacyTerms, RoundPlan, SiteLedger, compute_epsilon

runner = CliRunner()
DELTA = 1e-5


def _site(tmp_path: Path) -> Path:
    config = tmp_path / "site.yaml"
    config.write_text(
        "site_id: a\n"
        "data: {manifest: m.csv}\n"
        "paths: {workdir: w}\n"
        "privacy: {noise_multiplier: 1.0, epsilon_cap: 8.0, delta: 1e-5}\n",
        encoding="utf-8",
    )
    return config


def _site_ledger(tmp_path: Path) -> SiteLedger:
    workdir = tmp_path / "w"
    return SiteLedger(
        path=workdir / "ledger.jsonl", key_path=workdir / "keys" / "ledger_ed25519.pem", site_id="a"
    )


def _spend(ledger: SiteLedger, steps: int = 100) -> None:
    plan = RoundPlan(
        run_id="run-1",
        round=0,
        planned_rounds=None,
        steps=steps,
        sample_rate=0.01,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    ledger.reserve(plan=plan, terms=PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=8.0))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_json(accountant: str) -> None:
    args = ["privacy", "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.1"]
    args += ["--steps", "250", "--delta", "1e-5", "--accountant", accountant, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    history = [DPSteps(noise_multiplier=1.1, sample_rate=0.01, steps=250)]
    expected = compute_epsilon(history=history, delta=DELTA, accountant=accountant)  # type: ignore[arg-type]
    assert data["epsilon"] == expected
    assert data["accountant"] == accountant
    assert (data["delta"], data["sample_rate"], data["noise_multiplier"], data["steps"]) == (
        DELTA,
        0.01,
        1.1,
        250,
    )
    assert data["conversion"].startswith("rdp-improved" if accountant == "rdp" else "pld")


def test_epsilon_human_line() -> None:
    args = ["privacy", "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0"]
    result = runner.invoke(app, [*args, "--steps", "100", "--delta", "1e-5"])
    assert result.exit_code == 0
    history = [DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=100)]
    expected = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    assert f"epsilon = {expected:.4f}" in result.stdout


def test_epsilon_bad_value_is_a_privacy_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["privacy", "epsilon", "--sample-rate", "0", "--noise-multiplier", "1.0"]
    args += ["--steps", "100", "--delta", "1e-5"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, PrivacyError)
    code = _run_main(args, capsys)
    assert code == PrivacyError.exit_code
    assert capsys.readouterr().err.startswith("error[privacy]: sample rate must be in (0, 1]")


def test_ledger_of_a_new_site_is_empty(tmp_path: Path) -> None:
    result = runner.invoke(app, ["privacy", "ledger", "--config", str(_site(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "empty" and data["verified"] is True
    assert (data["entries"], data["spent"], data["remaining"], data["cap"]) == (0, 0.0, 8.0, 8.0)
    assert data["delta"] == DELTA and data["accountant"] == "rdp"


def test_ledger_reports_spent_epsilon(tmp_path: Path) -> None:
    config = _site(tmp_path)
    ledger = _site_ledger(tmp_path)
    _spend(ledger)
    result = runner.invoke(app, ["privacy", "ledger", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    history = list(ledger.verify().history)
    spent = compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    assert data["status"] == "verified" and data["verified"] is True
    # The terms entry and the reservation.
    assert (data["entries"], data["rounds"], data["open_reservations"]) == (2, 1, 1)
    assert data["terms_in_ledger"] is True and data["releases"] == 0
    assert data["spent"] == spent
    assert data["remaining"] == pytest.approx(8.0 - spent)
    assert set(data["epsilon_by_accountant"]) == {"rdp", "prv", "pld", "rdp-classic"}
    pld = compute_epsilon(history=history, delta=DELTA, accountant="pld")
    assert data["epsilon_by_accountant"]["pld"] == pld

    human = runner.invoke(app, ["privacy", "ledger", "--config", str(config)])
    assert human.exit_code == 0
    assert "remaining" in human.stdout and f"{spent:.4f}" in human.stdout


def test_ledger_says_whether_the_kept_values_open_its_sealed_releases(tmp_path: Path) -> None:
    from medfed.config import load_site_config
    from medfed.privacy import Release
    from medfed.site.release import sealed_release

    config = _site(tmp_path)
    site = load_site_config(config)
    counts = Release(
        run_id="run-1",
        round=1,
        quantity="patients",
        values={"train": 42.0, "validation": 3.0},
        mechanism="gaussian",
        noise_multiplier=5.0,
        sensitivity=1.0,
        noise_std=5.0,
    )
    _site_ledger(tmp_path).release(release=sealed_release(site, counts), terms=site.terms)
    data = json.loads(
        runner.invoke(app, ["privacy", "ledger", "--config", str(config), "--json"]).stdout
    )
    assert (data["releases"], data["sealed_releases"], data["sealed_opened"]) == (1, 1, 1)
    (site.paths.workdir / "releases" / "sealed.json").write_text("{}", encoding="utf-8")
    human = runner.invoke(app, ["privacy", "ledger", "--config", str(config)])
    assert human.exit_code == 0, human.output
    assert "1 sealed, 0 opened" in human.stdout and "sealed.json" in human.stdout


def test_tampered_ledger_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _site(tmp_path)
    ledger = _site_ledger(tmp_path)
    _spend(ledger)
    _spend(ledger)
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data.replace(b'"steps":100', b'"steps":10', 1))
    result = runner.invoke(app, ["privacy", "ledger", "--config", str(config), "--json"])
    assert result.exit_code != 0
    assert isinstance(result.exception, LedgerError)
    assert result.stdout == ""

    code = _run_main(["privacy", "ledger", "--config", str(config)], capsys)
    assert code == LedgerError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error[ledger]: ") and "line 2 (seq 1): bad signature" in err
    assert "(hint: restore the ledger" in err


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> int:
    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["medfed", *args]
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        sys.argv = saved
    return int(exited.value.code or 0)


def test_ledger_shows_both_guarantees_of_distributed_noise(tmp_path: Path) -> None:
    import math

    from medfed.privacy.distributed_noise import DistributedNoise, DistributedPlan

    config = _site(tmp_path)
    ledger = _site_ledger(tmp_path)
    _spend(ledger)
    shared = DistributedPlan(
        noise=DistributedNoise(
            clip=1.0,
            scale=64.0,
            beta=math.exp(-0.5),
            dim=1 << 12,
            local_stddev=60.0,
            count_weight=16,
        ),
        sites=9,
        budget="distributed",
    )
    plan = RoundPlan(
        run_id="run-2",
        round=1,
        planned_rounds=1,
        steps=1,
        sample_rate=1.0,
        noise_multiplier=shared.enforced_noise_multiplier,
        max_grad_norm=1.0,
        distributed=shared,
    )
    terms = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=8.0)
    ledger.commit(ledger.reserve(plan=plan, terms=terms), steps=1)
    result = runner.invoke(app, ["privacy", "ledger", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = ledger.verify()
    views = data["distributed_noise"]
    for view in ("distributed", "local"):
        history = report.history_of(view)  # type: ignore[arg-type]
        assert views[view] == compute_epsilon(history=history, delta=DELTA, accountant="rdp")
    assert data["spent"] == views["distributed"] < views["local"]
    assert (views["rounds"], views["sites"], views["budget_enforced_on"]) == (1, [9], "distributed")
    # PRV and PLD would bound the Gaussian equivalents, not the discrete mechanism: not shown
    assert set(data["epsilon_by_accountant"]) == {"rdp", "rdp-classic"}
    human = runner.invoke(
        app, ["privacy", "ledger", "--config", str(config)], env={"COLUMNS": "200"}
    )
    assert "distributed epsilon (9 sites' shares and secure aggregation hold)" in human.stdout
    assert "local epsilon (own noise alone)" in human.stdout
