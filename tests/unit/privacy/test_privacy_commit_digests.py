"""Commit entries that name the model trained from and the update sent (format 2, optional)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfed.errors import LedgerError
from medfed.privacy import (
    CommitEntry,
    PrivacyTerms,
    RoundPlan,
    SiteLedger,
    load_public_key,
    public_key_path,
    verify_ledger,
)
from medfed.privacy.entry_format import EntryFormatError, parse_entry
from medfed.privacy.events import canonical_json
from medfed.types import weights_digest

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, epsilon_cap=50.0)
MODEL = weights_digest({"w": np.zeros(3, dtype=np.float32)})
UPDATE = weights_digest({"w": np.ones(3, dtype=np.float32)})


def _plan(round: int = 1) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round,
        planned_rounds=2,
        steps=10,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / "ledger.jsonl", key_path=tmp_path / "keys" / "site.pem", site_id="a"
    )


def _lines(ledger: SiteLedger) -> list[dict[str, object]]:
    return [json.loads(line) for line in ledger.path.read_text().splitlines()]


def _commits(ledger: SiteLedger) -> list[CommitEntry]:
    return [e for e in ledger.verify().entries if isinstance(e, CommitEntry)]


def test_commit_digests_round_trip(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.commit(reservation, steps=7, model_sha256=MODEL, update_sha256=UPDATE)

    line = _lines(ledger)[-1]
    assert (line["kind"], line["v"]) == ("commit", 2)
    assert (line["model_sha256"], line["update_sha256"]) == (MODEL, UPDATE)
    (commit,) = _commits(ledger)
    assert (commit.seq, commit.reservation_seq, commit.steps) == (2, reservation.seq, 7)
    assert (commit.model_sha256, commit.update_sha256) == (MODEL, UPDATE)


def test_commits_without_digests_stay_as_they_were_and_verify(ledger: SiteLedger) -> None:
    # What every commit looked like before the digests: no such keys at all, not nulls.
    first = ledger.reserve(plan=_plan(round=1), terms=TERMS)
    ledger.commit(first, steps=10)
    second = ledger.reserve(plan=_plan(round=2), terms=TERMS)
    ledger.commit(second, steps=5, update_sha256=UPDATE)

    lines = _lines(ledger)
    assert "model_sha256" not in lines[2] and "update_sha256" not in lines[2]
    assert "model_sha256" not in lines[4] and lines[4]["update_sha256"] == UPDATE
    old, new = _commits(ledger)
    assert (old.model_sha256, old.update_sha256, old.steps) == (None, None, 10)
    assert (new.model_sha256, new.update_sha256, new.steps) == (None, UPDATE, 5)
    public = load_public_key(public_key_path(ledger.key_path))
    assert len(verify_ledger(ledger.path, public_key=public, site_id="a").entries) == 5


def test_the_signature_covers_the_digests(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    ledger.commit(reservation, steps=7, model_sha256=MODEL, update_sha256=UPDATE)
    lines = ledger.path.read_bytes().split(b"\n")
    edited = json.loads(lines[2])
    edited["update_sha256"] = MODEL
    lines[2] = canonical_json(edited)
    ledger.path.write_bytes(b"\n".join(lines))

    with pytest.raises(LedgerError, match=r"line 3 \(seq 2\).*bad signature"):
        ledger.verify()


def test_a_commit_refuses_a_digest_that_is_not_one(ledger: SiteLedger) -> None:
    reservation = ledger.reserve(plan=_plan(), terms=TERMS)
    before = ledger.path.read_bytes()

    with pytest.raises(LedgerError, match="update_sha256 'ABC' is not a SHA-256"):
        ledger.commit(reservation, steps=7, update_sha256="ABC")
    assert ledger.path.read_bytes() == before
    assert ledger.verify().open_reservations[0].seq == reservation.seq


def _commit_object(version: int, **extra: object) -> dict[str, object]:
    return {
        "v": version,
        "kind": "commit",
        "seq": 2,
        "prev_hash": "0" * 64,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "site_id": "a",
        "key_id": "0" * 16,
        "signature": "AAAA",
        "reservation_seq": 1,
        "steps": 3,
        **extra,
    }


def test_the_format_checks_the_digests() -> None:
    entry = parse_entry(_commit_object(2, model_sha256=MODEL))
    assert isinstance(entry, CommitEntry)
    assert (entry.model_sha256, entry.update_sha256) == (MODEL, None)
    with pytest.raises(EntryFormatError, match="field 'update_sha256': expected 64 lowercase"):
        parse_entry(_commit_object(2, update_sha256=MODEL.upper()))
    with pytest.raises(EntryFormatError, match="field 'model_sha256'"):
        parse_entry(_commit_object(2, model_sha256=None))
    # format 1 predates them: a format-1 commit that names one is not what medfed wrote
    with pytest.raises(EntryFormatError, match="unknown fields model_sha256"):
        parse_entry(_commit_object(1, model_sha256=MODEL))
