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
    RoundPlan,
    SiteLedger,
    compute_epsilon,
    load_or_create_signing_key,
)
from medfed.privacy.events import GENESIS_HASH, canonical_json, line_hash, sign
from medfed.privacy.keys import key_id

DELTA = 1e-5
CAP = BudgetCap(epsilon=50.0, delta=DELTA)


def _plan(round_: int, *, steps: int = 100, noise: float = 1.0) -> RoundPlan:
    return RoundPlan(
        run_id="run-1",
        round=round_,
        steps=steps,
        sample_rate=0.01,
        noise_multiplier=noise,
        max_grad_norm=1.0,
        delta=DELTA,
        dataset_size=100,
        accountant="rdp",
    )


def _site_ledger(root: Path, site_id: str, *, key: str | None = None) -> SiteLedger:
    return SiteLedger(
        path=root / site_id / "ledger.jsonl",
        key_path=root / "keys" / f"{key or site_id}.pem",
        site_id=site_id,
    )


def _five_entries(ledger: SiteLedger) -> list[str]:
    """Reserve, commit fewer, reserve, commit all, reserve (left open): five lines."""
    first = ledger.reserve(plan=_plan(0), cap=CAP)
    ledger.commit(first, steps=60)
    second = ledger.reserve(plan=_plan(1, noise=1.5), cap=CAP)
    ledger.commit(second, steps=100)
    ledger.reserve(plan=_plan(2, steps=40), cap=CAP)
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
    return _five_entries(site_a)


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
    histories = {2: [first], 3: [first, second_open]}
    for start, stop in [(0, 2), (2, 2), (2, 3), (3, 5)]:
        budget = tracker.receive(site_id="a", first_seq=start, lines=lines_a[start:stop], cap=CAP)
        assert budget.entries == tracker.known_entries("a") == stop
        if stop in histories:
            expected = compute_epsilon(history=histories[stop], delta=DELTA, accountant="rdp")
            assert budget.epsilon_spent == expected

    budget = tracker.budget("a")
    assert budget == SiteBudget(
        site_id="a",
        entries=5,
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


def test_a_restarted_tracker_remembers(
    tracker: BudgetTracker,
    lines_a: list[str],
    copies: Path,
    keys: dict[str, Ed25519PublicKey],
    site_a: SiteLedger,
) -> None:
    cap = BudgetCap(epsilon=20.0, delta=1e-6)
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3], cap=cap)
    before = tracker.budget("a")

    again = BudgetTracker(directory=copies, public_keys=keys)
    assert again.known_entries("a") == 3
    assert again.budget("a") == before  # the reported cap is remembered too
    with pytest.raises(LedgerError, match="rolled back"):
        again.receive(site_id="a", first_seq=0, lines=lines_a, cap=cap)
    final = again.receive(site_id="a", first_seq=3, lines=lines_a[3:], cap=cap)
    assert final.epsilon_spent == site_a.spent(delta=1e-6, accountant="rdp")
    assert final.delta == 1e-6 and final.epsilon_cap == 20.0


def test_rollback_and_gap_are_refused_and_nothing_is_stored(
    tracker: BudgetTracker, lines_a: list[str], copies: Path
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3], cap=CAP)
    copy = (copies / "a.ledger.jsonl").read_bytes()
    with pytest.raises(LedgerError) as rolled:
        tracker.receive(site_id="a", first_seq=1, lines=lines_a[1:], cap=CAP)
    assert rolled.value.message == (
        "site 'a' sent entries from seq 1 but the aggregator holds 3: the site's ledger was "
        "rolled back or replaced"
    )
    assert rolled.value.hint
    with pytest.raises(LedgerError, match="from seq 4 but the aggregator holds 3: entries 3 to 3"):
        tracker.receive(site_id="a", first_seq=4, lines=lines_a[4:], cap=CAP)
    with pytest.raises(LedgerError, match="from seq 0 but the aggregator holds 3"):
        tracker.receive(site_id="a", first_seq=0, lines=[], cap=CAP)
    assert (copies / "a.ledger.jsonl").read_bytes() == copy
    assert tracker.known_entries("a") == 3


def test_a_new_ledger_under_the_same_key_does_not_continue_the_copy(
    tracker: BudgetTracker, site_a: SiteLedger, lines_a: list[str], tmp_path: Path, copies: Path
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3], cap=CAP)
    fresh = SiteLedger(path=tmp_path / "fresh.jsonl", key_path=site_a.key_path, site_id="a")
    fresh_lines = _five_entries(fresh)
    with pytest.raises(LedgerError, match=r"line 4 \(seq 3\): hash chain broken"):
        tracker.receive(site_id="a", first_seq=3, lines=fresh_lines[3:], cap=CAP)
    assert (copies / "a.ledger.jsonl").read_bytes() == _stored(lines_a[:3])


def _edited(lines: list[str], tmp_path: Path) -> list[str]:
    obj = json.loads(lines[3])
    obj["steps"] = 1  # commits fewer steps than the site signed
    return [*lines[:3], canonical_json(obj).decode("ascii"), *lines[4:]]


def _reordered(lines: list[str], tmp_path: Path) -> list[str]:
    return [*lines[:2], lines[3], lines[2], lines[4]]


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
    return _resigned(lines, 2, impostor, key_id=key_id(impostor.public_key()))


def _foreign_signature(lines: list[str], tmp_path: Path) -> list[str]:
    # A key the aggregator never registered, claiming to be site a's key.
    return _resigned(lines, 2, Ed25519PrivateKey.generate())


def _other_site(lines: list[str], tmp_path: Path) -> list[str]:
    # Signed with a's own key, but written for site b.
    own = load_or_create_signing_key(tmp_path / "sites" / "keys" / "a.pem")
    return _resigned(lines, 2, own, site_id="b")


def _not_canonical(lines: list[str], tmp_path: Path) -> list[str]:
    return [*lines[:2], json.dumps(json.loads(lines[2]), sort_keys=True), *lines[3:]]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_edited, r"line 4 \(seq 3\): bad signature"),
        (_reordered, r"line 3 \(seq 3\): seq 3 where seq 2 was expected"),
        (_foreign_key, r"line 3 \(seq 2\): signed by key [0-9a-f]{16}, not by this site's key"),
        (_foreign_signature, r"line 3 \(seq 2\): bad signature"),
        (_other_site, r"line 3 \(seq 2\): entry of site 'b', expected 'a'"),
        (_not_canonical, r"line 3 \(seq 2\): not in canonical form"),
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
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:2], cap=CAP)
    before = (copies / "a.ledger.jsonl").read_bytes()
    budget = tracker.budget("a")
    sent = tamper(lines_a, tmp_path)[2:]
    other_cap = BudgetCap(epsilon=99.0, delta=DELTA)
    with pytest.raises(LedgerError, match=message) as caught:
        tracker.receive(site_id="a", first_seq=2, lines=sent, cap=other_cap)
    assert "ledger of site 'a'" in caught.value.message
    assert "the aggregator holds 2" in caught.value.message
    assert caught.value.hint and "nothing was stored" in caught.value.hint
    assert (copies / "a.ledger.jsonl").read_bytes() == before
    assert tracker.known_entries("a") == 2
    assert tracker.budget("a") == budget  # the cap of a refused reply is not taken either
    assert BudgetTracker(directory=copies, public_keys=keys).budget("a") == budget


def _signed_commit(
    ledger: SiteLedger, lines: list[str], *, reservation_seq: int, steps: int
) -> str:
    entry: dict[str, Any] = {
        "v": 1,
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
        (4, 41, "commit of 41 steps exceeds the 40 steps reserved at seq 4"),
        (0, 10, "reservation seq 0 was already committed at seq 1"),
        (1, 10, "commit refers to seq 1, which is no reservation"),
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
    tracker.receive(site_id="a", first_seq=0, lines=lines_a, cap=CAP)
    bad = _signed_commit(site_a, lines_a, reservation_seq=reservation_seq, steps=steps)
    with pytest.raises(LedgerError, match=message):
        tracker.receive(site_id="a", first_seq=5, lines=[bad], cap=CAP)
    good = _signed_commit(site_a, lines_a, reservation_seq=4, steps=40)
    assert tracker.receive(site_id="a", first_seq=5, lines=[good], cap=CAP).entries == 6


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
        tracker.receive(site_id="a", first_seq=0, lines=lines, cap=CAP)
    assert not (copies / "a.ledger.jsonl").exists()
    assert not (copies / "a.cap.json").exists()


def test_unknown_sites_are_refused(
    tracker: BudgetTracker, lines_a: list[str], copies: Path
) -> None:
    calls: list[Callable[[], object]] = [
        lambda: tracker.receive(site_id="c", first_seq=0, lines=lines_a, cap=CAP),
        lambda: tracker.known_entries("c"),
        lambda: tracker.budget("c"),
        lambda: tracker.can_afford(site_id="c", planned=_plan(0).dp_steps),
    ]
    for call in calls:
        with pytest.raises(LedgerError, match="site 'c' has no registered ledger key") as caught:
            call()
        assert "registered sites: a, b" in (caught.value.hint or "")
    assert not any(path.name.startswith("c.") for path in copies.iterdir())


def test_can_afford_uses_the_sites_cap_and_history(
    tracker: BudgetTracker, site_a: SiteLedger, lines_a: list[str]
) -> None:
    planned = DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=200)
    history = list(site_a.verify().history)
    reach = compute_epsilon(history=[*history, planned], delta=DELTA, accountant="rdp")
    spent = site_a.spent(delta=DELTA, accountant="rdp")

    roomy = BudgetCap(epsilon=reach * (1 + 1e-9), delta=DELTA)
    tracker.receive(site_id="a", first_seq=0, lines=lines_a, cap=roomy)
    assert tracker.can_afford(site_id="a", planned=planned)

    tight = BudgetCap(epsilon=reach * (1 - 1e-9), delta=DELTA)
    budget = tracker.receive(site_id="a", first_seq=5, lines=[], cap=tight)
    assert budget.epsilon_cap == tight.epsilon and budget.epsilon_spent == spent
    assert not tracker.can_afford(site_id="a", planned=planned)
    assert tracker.can_afford(site_id="a", planned=DPSteps(1.0, 0.01, 0))

    spent_out = tracker.receive(site_id="a", first_seq=5, lines=[], cap=BudgetCap(spent, DELTA))
    assert spent_out.exhausted and spent_out.remaining == 0.0
    assert not tracker.can_afford(site_id="a", planned=DPSteps(1.0, 0.01, 1))


def test_epsilon_is_computed_again_only_for_new_entries_or_another_delta(
    tracker: BudgetTracker, lines_a: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfed.aggregator.budget as budget_module

    calls: list[float] = []

    def counting(**kwargs: Any) -> float:
        calls.append(kwargs["delta"])
        return compute_epsilon(**kwargs)

    monkeypatch.setattr(budget_module, "compute_epsilon", counting)
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:2], cap=CAP)
    tracker.budget("a")
    tracker.all()
    tracker.receive(site_id="a", first_seq=2, lines=[], cap=CAP)
    assert calls == [DELTA]
    tracker.receive(site_id="a", first_seq=2, lines=lines_a[2:], cap=CAP)
    tracker.receive(site_id="a", first_seq=5, lines=[], cap=BudgetCap(epsilon=9.0, delta=1e-7))
    tracker.budget("a")
    assert calls == [DELTA, DELTA, 1e-7]


def test_caps_configured_at_the_aggregator_stand_in_until_the_site_reports(
    copies: Path, keys: dict[str, Ed25519PublicKey], lines_a: list[str]
) -> None:
    agreed = BudgetCap(epsilon=4.0, delta=DELTA)
    tracker = BudgetTracker(directory=copies, public_keys=keys, caps={"a": agreed})
    assert tracker.budget("a").epsilon_cap == 4.0 and tracker.budget("a").epsilon_spent == 0.0
    with pytest.raises(PrivacyError, match="no privacy cap is known for site 'b'"):
        tracker.budget("b")
    assert set(tracker.all()) == {"a"}
    state = tracker.state_json()
    assert state["sites_without_cap"] == {"b": {"entries": 0, "last_hash": GENESIS_HASH}}

    tracker.receive(site_id="a", first_seq=0, lines=lines_a, cap=CAP)
    tracker.receive(site_id="b", first_seq=0, lines=[], cap=BudgetCap(epsilon=2.0, delta=DELTA))
    assert tracker.budget("a").epsilon_cap == CAP.epsilon  # the site's own cap wins
    state = json.loads(json.dumps(tracker.state_json(), allow_nan=False))
    assert state["accountant"] == "rdp" and state["sites_without_cap"] == {}
    assert state["sites"]["a"]["entries"] == 5
    assert state["sites"]["a"]["epsilon_spent"] == tracker.budget("a").epsilon_spent
    assert state["sites"]["b"] == {
        "site_id": "b",
        "entries": 0,
        "epsilon_spent": 0.0,
        "epsilon_cap": 2.0,
        "remaining": 2.0,
        "exhausted": False,
        "delta": DELTA,
        "accountant": "rdp",
        "last_hash": GENESIS_HASH,
    }
    with pytest.raises(ConfigError, match="site 'z', which has no key"):
        BudgetTracker(directory=copies, public_keys=keys, caps={"z": agreed})


def test_a_copy_changed_on_disk_is_detected(
    tracker: BudgetTracker, copies: Path, keys: dict[str, Ed25519PublicKey], lines_a: list[str]
) -> None:
    tracker.receive(site_id="a", first_seq=0, lines=lines_a[:3], cap=CAP)
    copy = copies / "a.ledger.jsonl"
    copy.write_bytes(_stored(lines_a[:2]))  # one entry cut off
    with pytest.raises(LedgerError, match="changed on disk: it no longer begins with the 3"):
        tracker.receive(site_id="a", first_seq=2, lines=lines_a[2:], cap=CAP)
    assert copy.read_bytes() == _stored(lines_a[:2])
    copy.write_bytes(_stored(lines_a[:4]))  # another writer's verified append is kept
    assert tracker.receive(site_id="a", first_seq=4, lines=lines_a[4:], cap=CAP).entries == 5
    copy.write_bytes(_stored([lines_a[1], lines_a[0]]))
    with pytest.raises(LedgerError, match="the aggregator's copy of site 'a'") as caught:
        BudgetTracker(directory=copies, public_keys=keys)
    assert "restore the copy" in (caught.value.hint or "")
    with pytest.raises(LedgerError, match="the aggregator's copy of site 'a'"):
        tracker.receive(site_id="a", first_seq=5, lines=[], cap=CAP)
    other = dict(keys, a=Ed25519PrivateKey.generate().public_key())
    copy.write_bytes(_stored(lines_a[:3]))
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
    with pytest.raises(PrivacyError, match="unknown accountant"):
        BudgetTracker(directory=copies, public_keys=keys, accountant="gdp")  # type: ignore[arg-type]


def test_a_provisioned_kit_signs_what_the_aggregator_accepts(tmp_path: Path) -> None:
    from medfed.transport import provision_workspace

    ws = provision_workspace(out=tmp_path / "ws", sites=["a", "b"], host="localhost")
    ledger = SiteLedger(
        path=tmp_path / "work" / "ledger.jsonl",
        key_path=ws.root / "sites/a/ledger_key.pem",
        site_id="a",
    )
    lines = _five_entries(ledger)
    keys = {entry.site_id: ws.ledger_public_key(entry.site_id) for entry in ws.manifest.sites}
    tracker = BudgetTracker(directory=tmp_path / "copies", public_keys=keys)
    budget = tracker.receive(site_id="a", first_seq=0, lines=lines, cap=CAP)
    assert budget.epsilon_spent == ledger.spent(delta=DELTA, accountant="rdp")
    with pytest.raises(LedgerError, match="not by this site's key"):
        tracker.receive(
            site_id="b", first_seq=0, lines=_lines(_other_as_b(ledger, tmp_path)), cap=CAP
        )


def _other_as_b(ledger: SiteLedger, tmp_path: Path) -> SiteLedger:
    # Site a's provisioned key signing entries that claim to be site b's.
    as_b = SiteLedger(path=tmp_path / "as-b.jsonl", key_path=ledger.key_path, site_id="b")
    as_b.reserve(plan=_plan(0), cap=CAP)
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
