"""Every way of altering a ledger is detected, and the error names the entry and the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.errors import LedgerError
from medfed.privacy import (
    PrivacyTerms,
    Release,
    RoundPlan,
    SiteLedger,
    key_id,
    load_or_create_signing_key,
)
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
from medfed.privacy.ledger_head import write_head

TERMS = PrivacyTerms(accountant="rdp", delta=1e-5, epsilon_cap=50.0)


def _plan(round_: int, noise: float = 1.0) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round_,
        planned_rounds=10,
        steps=100,
        sample_rate=0.01,
        noise_multiplier=noise,
        max_grad_norm=1.0,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> SiteLedger:
    """Five entries: terms (seq 0), reserve (seq 1), its commit (seq 2), two open
    reservations (seq 3, 4)."""
    site = SiteLedger(
        path=tmp_path / "ledger.jsonl", key_path=tmp_path / "keys" / "site.pem", site_id="a"
    )
    site.commit(site.reserve(plan=_plan(0), terms=TERMS), steps=60)
    site.reserve(plan=_plan(1), terms=TERMS)
    site.reserve(plan=_plan(2, noise=1.5), terms=TERMS)
    return site


def _lines(ledger: SiteLedger) -> list[bytes]:
    return ledger.path.read_bytes().split(b"\n")[:-1]


def _write(ledger: SiteLedger, lines: list[bytes]) -> None:
    ledger.path.write_bytes(b"".join(line + b"\n" for line in lines))


def _objects(ledger: SiteLedger) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(ledger)]


def _rewrite_with_site_key(ledger: SiteLedger, objects: list[dict[str, Any]]) -> None:
    """What only the key holder can do: re-chain, re-sign and re-head arbitrary entries."""
    key = load_or_create_signing_key(ledger.key_path)
    previous, lines = GENESIS_HASH, []
    for obj in objects:
        unsigned = {k: v for k, v in obj.items() if k != "signature"}
        unsigned["prev_hash"] = previous
        line = canonical_json(sign(unsigned, key))
        lines.append(line)
        previous = line_hash(line)
    _write(ledger, lines)
    write_head(ledger.path, site_id="a", count=len(lines), last_hash=previous, private_key=key)


def _detected(ledger: SiteLedger, *fragments: str) -> LedgerError:
    with pytest.raises(LedgerError) as caught:
        ledger.verify()
    error = caught.value
    for fragment in fragments:
        assert fragment in error.message, error.message
    assert error.hint is not None and "backup" in error.hint
    assert "never edit" in error.hint
    return error


def test_untouched_ledger_verifies(ledger: SiteLedger) -> None:
    report = ledger.verify()
    assert len(report.entries) == 5 and report.terms == TERMS


def test_edited_value(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    assert b'"noise_multiplier":1.5' in lines[4]
    lines[4] = lines[4].replace(b'"noise_multiplier":1.5', b'"noise_multiplier":3.0')
    _write(ledger, lines)
    _detected(ledger, "line 5 (seq 4)", "bad signature")


def test_edited_terms(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    lines[0] = lines[0].replace(b'"delta":1e-05', b'"delta":0.001')
    _write(ledger, lines)
    _detected(ledger, "line 1 (seq 0)", "bad signature")


def test_deleted_middle_line(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    del lines[2]
    _write(ledger, lines)
    _detected(ledger, "line 3 (seq 3)", "seq 3 where seq 2 was expected")


def test_reordered_lines(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    lines[3], lines[4] = lines[4], lines[3]
    _write(ledger, lines)
    _detected(ledger, "line 4 (seq 4)", "seq 4 where seq 3 was expected")


def test_truncated_last_line(ledger: SiteLedger) -> None:
    _write(ledger, _lines(ledger)[:-1])
    _detected(ledger, "head", "records 5 entries but the ledger holds 4", "cut off", "seq 4")


def test_torn_partial_last_line(ledger: SiteLedger) -> None:
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])
    _detected(ledger, "line 5", "incomplete last line")


def test_torn_line_in_the_middle(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    lines[2] = lines[2][: len(lines[2]) // 2]
    _write(ledger, lines)
    _detected(ledger, "line 3", "not valid JSON")


def test_entry_signed_by_foreign_key(ledger: SiteLedger) -> None:
    foreign = Ed25519PrivateKey.generate()
    objects = _objects(ledger)
    last = {k: v for k, v in objects[4].items() if k != "signature"}
    last["key_id"] = key_id(foreign.public_key())
    lines = _lines(ledger)
    lines[4] = canonical_json(sign(last, foreign))
    _write(ledger, lines)
    error = _detected(ledger, "line 5 (seq 4)", f"signed by key {last['key_id']}")
    assert "not by this site's key" in error.message


def test_foreign_signature_under_site_key_id(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    last = {k: v for k, v in objects[4].items() if k != "signature"}
    lines = _lines(ledger)
    lines[4] = canonical_json(sign(last, Ed25519PrivateKey.generate()))
    _write(ledger, lines)
    _detected(ledger, "line 5 (seq 4)", "bad signature")


def test_entry_appended_by_hand(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    forged = json.loads(lines[3])
    forged.update(seq=5, prev_hash=line_hash(lines[4]), steps=1)
    _write(ledger, [*lines, canonical_json(forged)])
    _detected(ledger, "line 6 (seq 5)", "bad signature")


def test_unsigned_entry_appended_by_hand(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    forged = {k: v for k, v in json.loads(lines[3]).items() if k != "signature"}
    forged.update(seq=5, prev_hash=line_hash(lines[4]))
    _write(ledger, [*lines, canonical_json(forged)])
    _detected(ledger, "line 6 (seq 5)", "missing fields signature")


def test_unknown_field(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    obj = json.loads(lines[1])
    obj["comment"] = "ok"
    lines[1] = canonical_json(obj)
    _write(ledger, lines)
    _detected(ledger, "line 2 (seq 1)", "unknown fields comment")


def test_edited_chain_link(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    obj = json.loads(lines[3])
    obj["prev_hash"] = "f" * 64
    lines[3] = canonical_json(obj)
    _write(ledger, lines)
    _detected(ledger, "line 4 (seq 3)", "hash chain broken")


def test_missing_head(ledger: SiteLedger) -> None:
    ledger.path.with_name("ledger.jsonl.head").unlink()
    _detected(ledger, "head ledger.jsonl.head", "missing while the ledger holds 5 entries")


def test_head_signed_by_foreign_key(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    write_head(
        ledger.path,
        site_id="a",
        count=len(lines),
        last_hash=line_hash(lines[-1]),
        private_key=Ed25519PrivateKey.generate(),
    )
    _detected(ledger, "head", "bad signature or foreign key")


def test_deleted_ledger_with_head_left(ledger: SiteLedger) -> None:
    ledger.path.unlink()
    _detected(ledger, "head", "records 5 entries but the ledger holds 0")


def test_crash_before_head_update_is_accepted_and_repaired(ledger: SiteLedger) -> None:
    head = ledger.path.with_name("ledger.jsonl.head")
    old_head = head.read_bytes()
    ledger.reserve(plan=_plan(3), terms=TERMS)
    head.write_bytes(old_head)  # as if the process died between append and head update
    report = ledger.verify()
    assert report.head_lagging and len(report.entries) == 6
    assert len(report.history) == 4  # the unheaded reservation still counts
    ledger.reserve(plan=_plan(4), terms=TERMS)
    assert not ledger.verify().head_lagging


def test_lines_added_behind_the_head(ledger: SiteLedger) -> None:
    head = ledger.path.with_name("ledger.jsonl.head")
    old_head = head.read_bytes()
    ledger.reserve(plan=_plan(3), terms=TERMS)
    ledger.reserve(plan=_plan(4), terms=TERMS)
    head.write_bytes(old_head)
    _detected(ledger, "head", "lines 6 to 7 were added without updating the head")


def test_nothing_is_appended_to_a_damaged_ledger(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    del lines[2]
    _write(ledger, lines)
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerError, match=re.escape("line 3 (seq 3)")):
        ledger.reserve(plan=_plan(5), terms=TERMS)
    assert ledger.path.read_bytes() == before


# What a holder of the site key could still get wrong by writing entries outside SiteLedger:
# the ledger's own rules are checked independently of signatures.


def test_resigned_seq_gap(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    del objects[2]
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 3 (seq 3)", "seq 3 where seq 2 was expected")


def test_resigned_commit_beyond_reservation(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects.append({**objects[2], "seq": 5, "reservation_seq": 3, "steps": 101})
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 6 (seq 5)", "commit of 101 steps exceeds the 100 steps reserved")


def test_resigned_second_commit(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects.append({**objects[2], "seq": 5, "steps": 10})
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 6 (seq 5)", "reservation seq 1 was already committed at seq 2")


def test_resigned_commit_of_unknown_reservation(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects.append({**objects[2], "seq": 5, "reservation_seq": 2})
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 6 (seq 5)", "commit refers to seq 2, which is no reservation")


def test_resigned_entry_of_another_site(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects[3]["site_id"] = "b"
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 4 (seq 3)", "entry of site 'b', expected 'a'")


def test_resigned_missing_field(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    del objects[1]["round"]
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 2 (seq 1)", "missing fields round")


def test_resigned_bad_value(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects[3]["sample_rate"] = 0
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 4 (seq 3)", "field 'sample_rate'", "sample rate must be in (0, 1]")


def test_resigned_reservation_before_any_terms(ledger: SiteLedger) -> None:
    objects = _objects(ledger)[1:]
    for index, obj in enumerate(objects):
        obj["seq"] = index
        if obj["kind"] == "commit":
            obj["reservation_seq"] -= 1
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 1 (seq 0)", "before any terms entry")


def test_resigned_loss_release_without_its_reservation(ledger: SiteLedger) -> None:
    ledger.release(
        release=Release(
            run_id="run-1",
            round=0,
            quantity="train_loss",
            values={"loss": 0.5},
            mechanism="dp-sgd",
            noise_multiplier=1.0,
            sensitivity=2.0,
            noise_std=0.1,
            reservation_seq=1,
        ),
        terms=TERMS,
    )
    assert len(ledger.verify().releases) == 1
    objects = _objects(ledger)
    objects[-1]["reservation_seq"] = 3  # open, and of another round
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 6 (seq 5)", "names seq 3, which is no reservation of that round")


def test_resigned_format_one_entry_after_format_two(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    legacy = {**objects[1], "v": 1, "seq": 5, "delta": 1e-5, "dataset_size": 100}
    legacy["accountant"] = "rdp"
    del legacy["planned_rounds"]
    objects.append(legacy)
    _rewrite_with_site_key(ledger, objects)
    _detected(ledger, "line 6 (seq 5)", "a format-1 entry after format-2 entries")


def test_resigned_raised_delta_verifies_but_is_flagged(ledger: SiteLedger) -> None:
    objects = _objects(ledger)
    objects.append({**objects[0], "seq": 5, "delta": 1e-3, "epsilon_cap": 80.0})
    _rewrite_with_site_key(ledger, objects)
    report = ledger.verify()
    assert report.terms == PrivacyTerms(accountant="rdp", delta=1e-3, epsilon_cap=80.0)
    (first, raised) = report.terms_changes
    assert first.before is None and not first.raised
    assert raised.raised == "cap and delta" and raised.seq == 5


def test_reformatted_line(ledger: SiteLedger) -> None:
    lines = _lines(ledger)
    lines[2] = json.dumps(json.loads(lines[2]), indent=None).encode("ascii")
    _write(ledger, lines)
    _detected(ledger, "line 3 (seq 2)", "not in canonical form")
