"""Sealed releases: the ledger records their cost and a commitment, never their values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.errors import PrivacyError
from medfed.privacy import PrivacyTerms, Release, SiteLedger, compute_epsilon
from medfed.privacy.sealed import commitment_of, opens, seal

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, epsilon_cap=50.0)


def _ledger(path: Path) -> SiteLedger:
    return SiteLedger(path=path / "ledger.jsonl", key_path=path / "site.pem", site_id="a")


def _counts(**changes: object) -> Release:
    values: dict[str, object] = {
        "run_id": "run-1",
        "round": 1,
        "quantity": "patients",
        "values": {"train": 42.0, "validation": 1.0},
        "mechanism": "gaussian",
        "noise_multiplier": 5.0,
        "sensitivity": 1.0,
        "noise_std": 5.0,
    }
    values.update(changes)
    return Release(**values)  # type: ignore[arg-type]


def test_a_seal_opens_with_its_values_and_salt_only() -> None:
    sealed = seal({"train": 42, "validation": 1})
    assert len(sealed.salt) == 64 and len(sealed.commitment) == 64
    assert opens(
        commitment=sealed.commitment, values={"train": 42.0, "validation": 1}, salt=sealed.salt
    )
    assert not opens(
        commitment=sealed.commitment, values={"train": 43.0, "validation": 1.0}, salt=sealed.salt
    )
    assert not opens(commitment=sealed.commitment, values=sealed.values, salt="00" * 32)
    assert not opens(commitment=sealed.commitment, values=sealed.values, salt="not hex")
    # a fresh salt each time: equal values do not give equal commitments
    assert seal(sealed.values).commitment != sealed.commitment
    assert commitment_of(values=sealed.values, salt=sealed.salt) == sealed.commitment


def test_a_sealed_release_costs_what_the_same_release_in_the_clear_costs(tmp_path: Path) -> None:
    sealed, clear = _ledger(tmp_path / "sealed"), _ledger(tmp_path / "clear")
    kept = seal({"train": 42.0, "validation": 1.0})
    sealed.release(release=_counts(values={}, sealed=kept.commitment), terms=TERMS)
    clear.release(release=_counts(), terms=TERMS)
    entry = sealed.verify().latest_release("patients")
    assert entry is not None and entry.sealed == kept.commitment and entry.values == {}
    assert entry.noise_multiplier == 5.0 and entry.mechanism == "gaussian"
    assert sealed.verify().history == clear.verify().history
    assert sealed.spent() == clear.spent() > 0
    assert sealed.spent() == compute_epsilon(
        history=clear.verify().history, delta=1e-5, accountant="rdp"
    )
    (line,) = sealed.path.read_text(encoding="ascii").splitlines()[1:]
    record = json.loads(line)
    # the sealed values are nowhere in the line (digests and signatures may hold "42" as text)
    assert record["values"] == {} and '"train"' not in line
    assert 42.0 not in _numbers(record)


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [number for item in value.values() for number in _numbers(item)]
    if isinstance(value, list):
        return [number for item in value for number in _numbers(item)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    return []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sealed": "ab" * 32}, "a sealed release is a Gaussian one whose values stay at the site"),
        (
            {
                "values": {},
                "sealed": "ab" * 32,
                "mechanism": "public",
                "noise_multiplier": None,
                "sensitivity": None,
                "noise_std": None,
                "reason": "test",
            },
            "a sealed release is a Gaussian one",
        ),
        ({"values": {}, "sealed": "AB" * 32}, "64 lowercase hex digits"),
        ({"values": {}}, "holds the values train, validation"),
    ],
)
def test_a_malformed_sealed_release_is_never_written(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    ledger = _ledger(tmp_path)
    with pytest.raises(PrivacyError, match=message):
        ledger.release(release=_counts(**changes), terms=TERMS)
    assert ledger.verify().releases == ()


def test_an_entry_without_the_field_reads_as_not_sealed(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    ledger.release(release=_counts(), terms=TERMS)
    line = json.loads(ledger.path.read_text(encoding="ascii").splitlines()[-1])
    assert "sealed" not in line  # lines in the clear are written as before
    entry = ledger.verify().latest_release("patients")
    assert entry is not None and entry.sealed is None
