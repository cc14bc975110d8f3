"""An old copy of the ledger restored with its head verifies on its own; the head witness on
another volume refuses it, and only an explicit `medfed privacy witness` records a new one."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from medfed.errors import LedgerError
from medfed.privacy import PrivacyTerms, RoundPlan, SiteLedger
from medfed.privacy.ledger_head import head_path

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, epsilon_cap=50.0)


def _plan(round_: int) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round_,
        planned_rounds=10,
        steps=100,
        sample_rate=0.01,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


def _ledger(tmp_path: Path, *, witness: bool) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / "site" / "ledger.jsonl",
        key_path=tmp_path / "keys" / "site.pem",
        site_id="a",
        witness=tmp_path / "other-volume" if witness else None,
    )


def _spend(ledger: SiteLedger, round_: int) -> None:
    ledger.commit(ledger.reserve(plan=_plan(round_), terms=TERMS), steps=100)


def _roll_back(tmp_path: Path, ledger: SiteLedger) -> tuple[float, float]:
    """Spend, keep a copy of the ledger directory, spend more, restore the copy."""
    _spend(ledger, 0)
    backup = tmp_path / "backup"
    shutil.copytree(ledger.path.parent, backup)
    old_spent = ledger.spent()
    _spend(ledger, 1)
    new_spent = ledger.spent()
    shutil.rmtree(ledger.path.parent)
    shutil.copytree(backup, ledger.path.parent)
    return old_spent, new_spent


def test_without_a_witness_a_restored_old_ledger_verifies(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, witness=False)
    old_spent, new_spent = _roll_back(tmp_path, ledger)
    # the gap the witness closes: the spend since the copy is forgotten
    assert ledger.spent() == pytest.approx(old_spent) and old_spent < new_spent


def test_the_witness_refuses_a_restored_old_ledger(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, witness=True)
    _roll_back(tmp_path, ledger)
    assert ledger.witness is not None
    witness_file = ledger.witness.path
    assert stat.S_IMODE(witness_file.stat().st_mode) == 0o600
    with pytest.raises(LedgerError, match=r"records 5 entries but the ledger .* holds 3") as info:
        ledger.verify()
    assert str(witness_file) in info.value.message and "rolled back" in info.value.message
    with pytest.raises(LedgerError, match="rolled back"):
        ledger.reserve(plan=_plan(2), terms=TERMS)  # nothing is spent again
    assert len(ledger.path.read_bytes().splitlines()) == 3  # terms, reserve, commit


def test_the_witness_refuses_a_deleted_ledger_and_another_history(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, witness=True)
    _spend(ledger, 0)
    shutil.rmtree(ledger.path.parent)
    with pytest.raises(LedgerError, match=r"records 3 entries but the ledger .* holds 0"):
        ledger.verify()
    # a ledger started afresh with the same key, as long as the witness's: other entries
    fresh = _ledger(tmp_path / "elsewhere", witness=False)
    fresh.key_path.parent.mkdir(parents=True)
    shutil.copy(ledger.key_path, fresh.key_path)
    _spend(fresh, 5)
    ledger.path.parent.mkdir(parents=True)
    shutil.copy(fresh.path, ledger.path)
    shutil.copy(head_path(fresh.path), head_path(ledger.path))
    with pytest.raises(LedgerError, match="does not match the ledger"):
        ledger.verify()


def test_a_missing_witness_is_refused_until_recorded_on_purpose(tmp_path: Path) -> None:
    plain = _ledger(tmp_path, witness=False)
    _spend(plain, 0)
    ledger = _ledger(tmp_path, witness=True)
    with pytest.raises(
        LedgerError, match=r"is missing while the ledger .* holds 3 entries"
    ) as info:
        ledger.verify()
    assert "medfed privacy witness" in (info.value.hint or "")
    report = ledger.record_witness()
    assert len(report.entries) == 3 and ledger.verify().entries == report.entries
    _spend(ledger, 1)  # kept up to date with every append
    assert ledger.witness is not None
    assert ledger.witness.path.read_bytes() == head_path(ledger.path).read_bytes()


def test_privacy_witness_records_and_site_check_reports_it(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from medfed.cli.app import app
    from medfed.config import load_site_config
    from medfed.site.preflight import check_witness

    config_file = tmp_path / "site.yaml"
    raw = {
        "site_id": "a",
        "data": {"manifest": "manifest.csv"},
        "paths": {"workdir": "work", "signing_key": "keys/site.pem"},
    }
    config_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_site_config(config_file)
    assert check_witness(config).status == "WARN"  # none configured
    _spend(SiteLedger(path=config.ledger_path, key_path=config.signing_key_path, site_id="a"), 0)

    raw["paths"]["head_witness"] = "other-volume"
    config_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_site_config(config_file)
    assert "not recorded yet" in check_witness(config).detail
    result = CliRunner().invoke(app, ["privacy", "witness", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "recorded the head of 3 entries" in result.output
    assert check_witness(config).status == "PASS"
    ledger = CliRunner().invoke(app, ["privacy", "ledger", "--config", str(config_file)])
    assert ledger.exit_code == 0, ledger.output
