"""The aggregator's budget tracker: verified copies of the sites' ledgers and their epsilon."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.aggregator import BudgetTracker, SiteBudget
from medfed.errors import ConfigError, LedgerError, PrivacyError
from medfed.privacy import (
    BudgetCap,
    DPSteps,
    PrivacyTerms,
    RoundPlan,
    SiteLedger,
    compute_epsilon,
    load_or_create_signing_key,
)
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
from medfed.privacy.keys import key_id

DELTA = 1e-5
CAP = BudgetCap(epsilon=50.0, delta=DELTA)
TERMS = PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=50.0)


def _plan(round_: int, *, steps: int = 100, noise: float = 1.0) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round_,
        planned_rounds=10,
        steps=steps,
        sample_rate=0.01,
        noise_multiplier=noise,
        max_grad_norm=1.0,
    )


def _site_ledger(root: Path, site_id: str, *, key: str | None = None) -> SiteLedger:
    return SiteLedger(
        path=root / site_id / "ledger.jsonl",
        key_path=root / "keys" / f"{key or site_id}.pem",
        site_id=site_id,
    )


def _six_entries(ledger: SiteLedger, terms: PrivacyTerms = TERMS) -> list[str]:
    """Terms, reserve, commit fewer, reserve, commit all, reserve (left open): six lines."""
    first = ledger.reserve(plan=_plan(0), terms=terms)
    ledger.commit(first, steps=60)
    second = ledger.reserve(plan=_plan(1, noise=1.5), terms=terms)
    ledger.commit(second, steps=100)
    ledger.reserve(plan=_plan(2, steps=40), terms=terms)
    return _lines(ledger)


def _lines(ledger: SiteLedger) -> list[str]:
    return ledger.path.read_text(encoding="ascii").splitlines()


def _stored(lines: list[str]) -> bytes:
    return b"".join(line.encode("ascii") + b"\n" for line in lines)


def _public(ledger: SiteLedger) -> Ed25519PublicKey:
    return load_or_create_signing_key(ledger.key_path).public_key()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def site_a(tmp_path: Path) -> SiteLedger:
    return _site_ledger(tmp_path / "sites", "a")


@pytest.fixture
def lines_a(site_a: SiteLedger) -> list[str]:
    return _six_entries(site_a)


@pytest.fixture
def keys(tmp_path: Path, site_a: SiteLedger, lines_a: list[str]) -> dict[str, Ed25519PublicKey]:
    other = _site_ledger(tmp_path / "sites", "b")
    return {"a": _public(site_a), "b": _public(other)}


@pytest.fixture
def copies(tmp_path: Path) -> Path:
    return tmp_path / "aggregator" / "ledgers"


@pytest.fixture
def tracker(copies: Path, keys: dict[str, Ed25519PublicKey]) -> BudgetTracker:
    return BudgetTracker(directory=copies, public_keys=keys)


def test_chunks_continue_the_copy_and_epsilon_is_the_sites(
    tracker: BudgetTracker, site_a: SiteLedger, lines_a: list[str], copies: Path
) -> None:
    assert tracker.known_entries("a") == 0
    first = DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=60)
    second_open = DPSteps(noise_multiplier=1.5, sample_rate=0.01, steps=100)
    histories = {3: [first], 4: [first, second_open]}
    for start, stop in [(0, 3), (3, 3), (3, 4), (4, 6)]:
        receipt = tracker.receive(site_id="a", first_seq=start, lines=lines_a[start:stop])
        budget = receipt.budget
        assert budget.entries == tracker.known_entries("a") == stop
        assert receipt.new_entries == stop - start and receipt.alerts == ()
        if stop in histories:
            expected = compute_epsilon(history=histories[stop], delta=DELTA, accountant="rdp")
            assert budget.epsilon_spent == expected

    budget = tracker.budget("a")
    assert budget == SiteBudget(
        site_id="a",
        entries=6,
        epsilon_spent=site_a.spent(delta=DELTA, accountant="rdp"),
        epsilon_cap=CAP.epsilon,
        delta=DELTA,
        accountant="rdp",
        last_hash=line_hash(lines_a[-1].encode("ascii")),
    )
    assert budget.epsilon_spent > 0 and budget.remaining == CAP.epsilon - budget.epsilon_spent
    assert not budget.exhausted
    # The copy is the site's ledger byte for byte, private to the aggregator.
    copy = copies / "a.ledger.jsonl"
    assert copy.read_bytes() == site_a.path.read_bytes()
    assert _mode(copy) == 0o600 and _mode(copies) == 0o700
    assert tracker.known_entries("b") == 0
    assert not (copies / "b.ledger.jsonl").exists()


def test_the_terms_come_from_the_signed_ledger(
    copies: Path, tmp_path: Path, keys: dict[str, Ed25519PublicKey]
) -> None:
    """Accountant, delta and cap are the ledger's: a PLD site is tracked with PLD."""
    site = _site_ledger(tmp_path / "sites", "b")
    terms = PrivacyTerms(accountant="pld", delta=1e-6, epsilon_cap=30.0)
    lines = _six_entries(site, terms)
    tracker = BudgetTracker(directory=copies, public_keys=keys)
    budget = tracker.receive(site_id="b", first_seq=0, lines=lines).budget
    assert (budget.accountant, budget.delta, budget.epsilon_cap) == ("pld", 1e-6, 30.0)
    assert budget.epsilon_spent == site.spent()
    assert budget.epsilon_spent == compute_epsilon(
        history=site.verify().history, delta=1e-6, accountant="pld"
    )
    assert tracker.terms("b") == terms


def test_a_raised_cap_or_delta_is_an_alert(
    copies: Path, tmp_path: Path, keys: dict[str, Ed25519PublicKey]
) -> None:
    site = _site_ledger(tmp_path / "sites", "b")
    lines = _six_entries(site)
    tracker = BudgetTracker(
        directory=copies, public_keys=keys, caps={"b": BudgetCap(epsilon=60.0, delta=DELTA)}
    )
    assert tracker.receive(site_id="b", first_seq=0, lines=lines).alerts == ()
    site.reserve(plan=_plan(3), terms=PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=70.0))
    receipt = tracker.receive(site_id="b", first_seq=6, lines=_lines(site)[6:])
    assert len(receipt.alerts) == 2
    assert "site b raised its cap: terms changed at seq 6" in receipt.alerts[0]
    assert "above the 60 agreed with it" in receipt.alerts[1]
    assert receipt.budget.epsilon_cap == 70.0
    # Old changes are not alerted again.
    assert tracker.receive(site_id="b", first_seq=8, lines=[]).alerts == ()


def test_a_restarted_tracker_remembers(
    copies: Path, keys: dict[str, Ed25519PublicKey], tmp_path: Path
) -> None:
    site = _site_ledger(tmp_path / "sites", "b")
    lines = _six_entries(site, PrivacyTerms(accountant="rdp", delta=1e-6, epsilon_cap=20.0))
    tracker = BudgetTracker(directory=copies, public_keys=keys)
    tracker.receive(site_id="b", first_seq=0, lines=lines[:4])
    before = tracker.budget("b")

    again = BudgetTracker(directory=copies, public_keys=keys)
    assert again.known_entries("b") == 4
    assert again.budget("b") == before  # the terms are in the copy itself
    with pytest.raises(LedgerError, match="rolled back"):
        again.receive(site_id="b", first_seq=0, lines=lines)
    final = again.receive(site_id="b", first_seq=4, lines=lines[4:]).budget
    assert final.epsilon_spent == site.spent(delta=1e-6, accountant="rdp")
    assert final.delta == 1e-6 and final.epsilon_cap == 20.0


def test_rollback_and_gap_are_refused_and_nothing_is_stored(
    tracker: BudgetTracker, lines_a: list[str], copies: Path
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:4])
    copy = (copies / "a.ledger.jsonl").read_bytes()
    with pytest.raises(LedgerError) as rolled:
        tracker.receive(site_id="a", first_seq=1, lines=lines_a[1:])
    assert rolled.value.message == (
        "site 'a' sent entries from seq 1 but the aggregator holds 4: the site's ledger was "
        "rolled back or replaced"
    )
    assert rolled.value.hint
    with pytest.raises(LedgerError, match="from seq 5 but the aggregator holds 4: entries 4 to 4"):
        tracker.receive(site_id="a", first_seq=5, lines=lines_a[5:])
    with pytest.raises(LedgerError, match="from seq 0 but the aggregator holds 4"):
        tracker.receive(site_id="a", first_seq=0, lines=[])
    assert (copies / "a.ledger.jsonl").read_bytes() == copy
    assert tracker.known_entries("a") == 4


def test_a_new_ledger_under_the_same_key_does_not_continue_the_copy(
    tracker: BudgetTracker, site_a: SiteLedger, lines_a: list[str], tmp_path: Path, copies: Path
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:4])
    fresh = SiteLedger(path=tmp_path / "fresh.jsonl", key_path=site_a.key_path, site_id="a")
    fresh_lines = _six_entries(fresh)
    with pytest.raises(LedgerError, match=r"line 5 \(seq 4\): hash chain broken"):
        tracker.receive(site_id="a", first_seq=4, lines=fresh_lines[4:])
    assert (copies / "a.ledger.jsonl").read_bytes() == _stored(lines_a[:4])


def _edited(lines: list[str], tmp_path: Path) -> list[str]:
    obj = json.loads(lines[4])
    obj["steps"] = 1  # commits fewer steps than the site signed
    return [*lines[:4], canonical_json(obj).decode("ascii"), *lines[5:]]


def _reordered(lines: list[str], tmp_path: Path) -> list[str]:
    return [*lines[:3], lines[4], lines[3], lines[5]]


def _resigned(lines: list[str], index: int, key: Ed25519PrivateKey, **changes: object) -> list[str]:
    """Line ``index`` changed and signed again with ``key``; still chained to the line before."""
    obj = json.loads(lines[index])
    del obj["signature"]
    obj.update(changes)
    line = canonical_json(sign(obj, key)).decode("ascii")
    return [*lines[:index], line]


def _foreign_key(lines: list[str], tmp_path: Path) -> list[str]:
    # A key the aggregator never registered for site a, naming itself.
    impostor = Ed25519PrivateKey.generate()
    return _resigned(lines, 3, impostor, key_id=key_id(impostor.public_key()))


def _foreign_signature(lines: list[str], tmp_path: Path) -> list[str]:
    # A key the aggregator never registered, claiming to be site a's key.
    return _resigned(lines, 3, Ed25519PrivateKey.generate())


def _other_site(lines: list[str], tmp_path: Path) -> list[str]:
    # Signed with a's own key, but written for site b.
    own = load_or_create_signing_key(tmp_path / "sites" / "keys" / "a.pem")
    return _resigned(lines, 3, own, site_id="b")


def _not_canonical(lines: list[str], tmp_path: Path) -> list[str]:
    return [*lines[:3], json.dumps(json.loads(lines[3]), sort_keys=True), *lines[4:]]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_edited, r"line 5 \(seq 4\): bad signature"),
        (_reordered, r"line 4 \(seq 4\): seq 4 where seq 3 was expected"),
        (_foreign_key, r"line 4 \(seq 3\): signed by key [0-9a-f]{16}, not by this site's key"),
        (_foreign_signature, r"line 4 \(seq 3\): bad signature"),
        (_other_site, r"line 4 \(seq 3\): entry of site 'b', expected 'a'"),
        (_not_canonical, r"line 4 \(seq 3\): not in canonical form"),
    ],
)
def test_tampered_entries_are_refused_and_nothing_is_stored(
    tracker: BudgetTracker,
    lines_a: list[str],
    copies: Path,
    tmp_path: Path,
    keys: dict[str, Ed25519PublicKey],
    tamper: Callable[[list[str], Path], list[str]],
    message: str,
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3])
    before = (copies / "a.ledger.jsonl").read_bytes()
    budget = tracker.budget("a")
    sent = tamper(lines_a, tmp_path)[3:]
    with pytest.raises(LedgerError, match=message) as caught:
        tracker.receive(site_id="a", first_seq=3, lines=sent)
    assert "ledger of site 'a'" in caught.value.message
    assert "the aggregator holds 3" in caught.value.message
    assert caught.value.hint and "nothing was stored" in caught.value.hint
    assert (copies / "a.ledger.jsonl").read_bytes() == before
    assert tracker.known_entries("a") == 3
    assert tracker.budget("a") == budget
    assert BudgetTracker(directory=copies, public_keys=keys).budget("a") == budget


def _signed_commit(
    ledger: SiteLedger, lines: list[str], *, reservation_seq: int, steps: int
) -> str:
    entry: dict[str, Any] = {
        "v": 2,
        "kind": "commit",
        "seq": len(lines),
        "prev_hash": line_hash(lines[-1].encode("ascii")) if lines else GENESIS_HASH,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "site_id": ledger.site_id,
        "key_id": key_id(_public(ledger)),
        "reservation_seq": reservation_seq,
        "steps": steps,
    }
    private = load_or_create_signing_key(ledger.key_path)
    return canonical_json(sign(entry, private)).decode("ascii")


@pytest.mark.parametrize(
    ("reservation_seq", "steps", "message"),
    [
        (5, 41, "commit of 41 steps exceeds the 40 steps reserved at seq 5"),
        (1, 10, "reservation seq 1 was already committed at seq 2"),
        (2, 10, "commit refers to seq 2, which is no reservation"),
        (9, 10, "commit refers to seq 9, which is no reservation"),
    ],
)
def test_a_signed_but_invalid_commit_is_refused(
    tracker: BudgetTracker,
    site_a: SiteLedger,
    lines_a: list[str],
    reservation_seq: int,
    steps: int,
    message: str,
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a)
    bad = _signed_commit(site_a, lines_a, reservation_seq=reservation_seq, steps=steps)
    with pytest.raises(LedgerError, match=message):
        tracker.receive(site_id="a", first_seq=6, lines=[bad])
    good = _signed_commit(site_a, lines_a, reservation_seq=5, steps=40)
    assert tracker.receive(site_id="a", first_seq=6, lines=[good]).budget.entries == 7


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{}\n{}"], "holds a line break"),
        (['{"x": "\u00e9"}'], "not ASCII"),
        ([b"{}"], "not a string"),
        ("{}", "one string"),
    ],
)
def test_malformed_lines_are_refused(
    tracker: BudgetTracker, copies: Path, lines: Any, message: str
) -> None:
    with pytest.raises(LedgerError, match=message):
        tracker.receive(site_id="a", first_seq=0, lines=lines)
    assert not (copies / "a.ledger.jsonl").exists()


def test_unknown_sites_are_refused(
    tracker: BudgetTracker, lines_a: list[str], copies: Path
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: tracker.receive(site_id="c", first_seq=0, lines=lines_a),
        lambda: tracker.known_entries("c"),
        lambda: tracker.budget("c"),
        lambda: tracker.can_afford(site_id="c", planned=_plan(0).dp_steps),
    ]
    for call in calls:
        with pytest.raises(LedgerError, match="site 'c' has no registered ledger key") as caught:
            call()
        assert "registered sites: a, b" in (caught.value.hint or "")
    assert not any(path.name.startswith("c.") for path in copies.iterdir())


def test_can_afford_uses_the_sites_terms_and_history(
    copies: Path, tmp_path: Path, keys: dict[str, Ed25519PublicKey]
) -> None:
    planned = DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=200)

    def tracked(cap: float) -> BudgetTracker:
        """Site b's six entries under ``cap``, as a fresh aggregator holds them."""
        site = SiteLedger(
            path=tmp_path / f"ledger-{cap}.jsonl",
            key_path=tmp_path / "sites" / "keys" / "b.pem",
            site_id="b",
        )
        lines = _six_entries(site, PrivacyTerms(accountant="rdp", delta=DELTA, epsilon_cap=cap))
        tracker = BudgetTracker(directory=tmp_path / f"copies-{cap}", public_keys=keys)
        tracker.receive(site_id="b", first_seq=0, lines=lines)
        return tracker

    probe = _site_ledger(tmp_path / "probe", "b", key="probe")
    _six_entries(probe)
    history = list(probe.verify().history)
    reach = compute_epsilon(history=[*history, planned], delta=DELTA, accountant="rdp")
    spent = compute_epsilon(history=history, delta=DELTA, accountant="rdp")

    assert tracked(reach * (1 + 1e-9)).can_afford(site_id="b", planned=planned)
    tight = tracked(reach * (1 - 1e-9))
    budget = tight.budget("b")
    assert budget.epsilon_spent == spent
    assert not tight.can_afford(site_id="b", planned=planned)
    assert tight.can_afford(site_id="b", planned=DPSteps(1.0, 0.01, 0))


def test_epsilon_is_computed_again_only_for_new_entries(
    tracker: BudgetTracker, lines_a: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfed.aggregator.budget as budget_module

    calls: list[float] = []

    def counting(**kwargs: Any) -> float:
        calls.append(kwargs["delta"])
        return compute_epsilon(**kwargs)

    monkeypatch.setattr(budget_module, "compute_epsilon", counting)
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3])
    tracker.budget("a")
    tracker.all()
    tracker.receive(site_id="a", first_seq=3, lines=[])
    assert calls == [DELTA]
    tracker.receive(site_id="a", first_seq=3, lines=lines_a[3:])
    tracker.budget("a")
    assert calls == [DELTA, DELTA]


def test_caps_agreed_at_the_aggregator_stand_in_for_a_format_one_ledger(
    copies: Path, keys: dict[str, Ed25519PublicKey], lines_a: list[str]
) -> None:
    agreed = BudgetCap(epsilon=4.0, delta=DELTA)
    tracker = BudgetTracker(directory=copies, public_keys=keys, caps={"a": agreed})
    assert tracker.budget("a").epsilon_cap == 4.0 and tracker.budget("a").epsilon_spent == 0.0
    with pytest.raises(PrivacyError, match="no privacy terms are known for site 'b'"):
        tracker.budget("b")
    assert set(tracker.all()) == {"a"}
    state = tracker.state_json()
    assert state["sites_without_cap"] == {"b": {"entries": 0, "last_hash": GENESIS_HASH}}

    receipt = tracker.receive(site_id="a", first_seq=0, lines=lines_a)
    assert tracker.budget("a").epsilon_cap == CAP.epsilon  # the ledger's own terms win
    assert "above the 4 agreed with it" in receipt.alerts[0]
    state = json.loads(json.dumps(tracker.state_json(), allow_nan=False))
    assert state["sites_without_cap"] == {"b": {"entries": 0, "last_hash": GENESIS_HASH}}
    assert state["sites"]["a"]["entries"] == 6
    assert state["sites"]["a"]["epsilon_spent"] == tracker.budget("a").epsilon_spent
    assert state["sites"]["a"]["accountant"] == "rdp"
    with pytest.raises(ConfigError, match="site 'z', which has no key"):
        BudgetTracker(directory=copies, public_keys=keys, caps={"z": agreed})


def test_a_copy_changed_on_disk_is_detected(
    tracker: BudgetTracker, copies: Path, keys: dict[str, Ed25519PublicKey], lines_a: list[str]
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:4])
    copy = copies / "a.ledger.jsonl"
    copy.write_bytes(_stored(lines_a[:3]))  # one entry cut off
    with pytest.raises(LedgerError, match="changed on disk: it no longer begins with the 4"):
        tracker.receive(site_id="a", first_seq=3, lines=lines_a[3:])
    assert copy.read_bytes() == _stored(lines_a[:3])
    copy.write_bytes(_stored(lines_a[:5]))  # another writer's verified append is kept
    assert tracker.receive(site_id="a", first_seq=5, lines=lines_a[5:]).budget.entries == 6
    copy.write_bytes(_stored([lines_a[1], lines_a[0]]))
    with pytest.raises(LedgerError, match="the aggregator's copy of site 'a'") as caught:
        BudgetTracker(directory=copies, public_keys=keys)
    assert "restore the copy" in (caught.value.hint or "")
    with pytest.raises(LedgerError, match="the aggregator's copy of site 'a'"):
        tracker.receive(site_id="a", first_seq=6, lines=[])
    other = dict(keys, a=Ed25519PrivateKey.generate().public_key())
    copy.write_bytes(_stored(lines_a[:4]))
    with pytest.raises(LedgerError, match="not by this site's key"):
        BudgetTracker(directory=copies, public_keys=other)  # a re-registered key


def test_bad_site_ids_and_keys_are_refused(copies: Path, keys: dict[str, Ed25519PublicKey]) -> None:
    for bad in ("../a", ".hidden", "", "a/b"):
        with pytest.raises(ConfigError, match="not a valid site id"):
            BudgetTracker(directory=copies, public_keys={bad: keys["a"]})
    with pytest.raises(ConfigError, match="duplicates"):
        BudgetTracker(directory=copies, public_keys={"a": keys["a"], "A": keys["b"]})
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        BudgetTracker(directory=copies, public_keys={"a": "key"})  # type: ignore[dict-item]


def test_a_provisioned_kit_signs_what_the_aggregator_accepts(tmp_path: Path) -> None:
    from medfed.transport import provision_workspace

    ws = provision_workspace(out=tmp_path / "ws", sites=["a", "b"], host="localhost")
    ledger = SiteLedger(
        path=tmp_path / "work" / "ledger.jsonl",
        key_path=ws.root / "sites/a/ledger_key.pem",
        site_id="a",
    )
    lines = _six_entries(ledger)
    keys = {entry.site_id: ws.ledger_public_key(entry.site_id) for entry in ws.manifest.sites}
    tracker = BudgetTracker(directory=tmp_path / "copies", public_keys=keys)
    budget = tracker.receive(site_id="a", first_seq=0, lines=lines).budget
    assert budget.epsilon_spent == ledger.spent(delta=DELTA, accountant="rdp")
    with pytest.raises(LedgerError, match="not by this site's key"):
        tracker.receive(site_id="b", first_seq=0, lines=_lines(_other_as_b(ledger, tmp_path)))


def _other_as_b(ledger: SiteLedger, tmp_path: Path) -> SiteLedger:
    # Site a's provisioned key signing entries that claim to be site b's.
    as_b = SiteLedger(path=tmp_path / "as-b.jsonl", key_path=ledger.key_path, site_id="b")
    as_b.reserve(plan=_plan(0), terms=TERMS)
    return as_b


def test_importing_the_aggregator_loads_no_training_code() -> None:
    code = (
        "import sys, medfed.aggregator\n"
        "heavy = ['torch', 'opacus', 'dp_accounting', 'monai', 'medfed.site']\n"
        "print(','.join(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
