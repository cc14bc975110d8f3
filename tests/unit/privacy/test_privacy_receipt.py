"""The aggregator's signed receipt of a site's ledger: a site whose ledger holds fewer or other
entries than the aggregator accepted is refused before anything is reserved, in a federated
round and, once a receipt is kept, in local training too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from site_support import policy_site, round_request

from medfed.config.site import SiteConfig
from medfed.errors import LedgerError
from medfed.privacy import PrivacyTerms, RoundPlan, SiteLedger
from medfed.privacy.keys import load_or_create_signing_key
from medfed.privacy.ledger_head import head_path
from medfed.privacy.receipt import make_receipt, read_receipt, receipt_path
from medfed.workspace import spki_pem

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


def _spend(ledger: SiteLedger, round_: int) -> None:
    ledger.commit(ledger.reserve(plan=_plan(round_), terms=TERMS), steps=100)


def _aggregator_key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_or_create_signing_key(tmp_path / "aggregator" / "receipt_key.pem")


def _ledger(tmp_path: Path, key: Ed25519PrivateKey) -> SiteLedger:
    return SiteLedger(
        path=tmp_path / "site" / "ledger.jsonl",
        key_path=tmp_path / "keys" / "site.pem",
        site_id="a",
        receipt_key=key.public_key(),
    )


def _receipt(ledger: SiteLedger, key: Ed25519PrivateKey, *, site_id: str = "a") -> str:
    """What the aggregator signs after it verified and copied the whole ledger."""
    report = ledger.verify()
    return make_receipt(
        site_id=site_id, count=len(report.entries), last_hash=report.last_hash, private_key=key
    )


def test_a_rolled_back_directory_is_refused_by_the_next_receipt(tmp_path: Path) -> None:
    key = _aggregator_key(tmp_path)
    ledger = _ledger(tmp_path, key)
    _spend(ledger, 0)
    ledger.accept_receipt(_receipt(ledger, key))
    backup = tmp_path / "backup"
    shutil.copytree(ledger.path.parent, backup)  # ledger, head and receipt of 3 entries
    old_spent = ledger.spent()
    _spend(ledger, 1)
    newest = _receipt(ledger, key)
    ledger.accept_receipt(newest)
    assert ledger.spent() > old_spent
    shutil.rmtree(ledger.path.parent)
    shutil.copytree(backup, ledger.path.parent)
    before = ledger.path.read_bytes()

    # on its own the old directory verifies: what it holds is consistent
    assert len(ledger.verify().entries) == 3
    with pytest.raises(LedgerError, match=r"accepted 5 entries .* holds 3: the ledger was rolled"):
        ledger.accept_receipt(newest)
    assert ledger.path.read_bytes() == before
    assert (
        read_receipt(
            receipt_path(ledger.path).read_text("ascii").strip(),
            public_key=key.public_key(),
            site_id="a",
        ).count
        == 3
    )  # the refused receipt was not kept either


def test_a_kept_receipt_refuses_a_restored_ledger_file_in_local_training(tmp_path: Path) -> None:
    key = _aggregator_key(tmp_path)
    ledger = _ledger(tmp_path, key)
    _spend(ledger, 0)
    old = {p.name: p.read_bytes() for p in ledger.path.parent.iterdir()}
    _spend(ledger, 1)
    ledger.accept_receipt(_receipt(ledger, key))
    for name, content in old.items():  # the ledger and its head, not the receipt beside them
        (ledger.path.parent / name).write_bytes(content)
    with pytest.raises(LedgerError, match="rolled back") as info:
        ledger.reserve(plan=_plan(2), terms=TERMS)
    assert str(receipt_path(ledger.path)) in info.value.message
    assert len(ledger.path.read_bytes().splitlines()) == 3

    # the same site without the aggregator's key: the gap the receipt closes
    plain = SiteLedger(path=ledger.path, key_path=ledger.key_path, site_id="a")
    assert len(plain.verify().entries) == 3


def test_a_rewritten_ledger_of_the_same_length_is_refused(tmp_path: Path) -> None:
    key = _aggregator_key(tmp_path)
    ledger = _ledger(tmp_path, key)
    _spend(ledger, 0)
    receipt = _receipt(ledger, key)
    other = _ledger(tmp_path / "other", key)
    other.key_path.parent.mkdir(parents=True)
    shutil.copy(ledger.key_path, other.key_path)
    _spend(other, 7)  # same key, same length, other entries
    with pytest.raises(LedgerError, match="differs from the one the aggregator accepted"):
        other.accept_receipt(receipt)


def test_forged_foreign_and_malformed_receipts_are_refused(tmp_path: Path) -> None:
    key = _aggregator_key(tmp_path)
    ledger = _ledger(tmp_path, key)
    _spend(ledger, 0)
    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(LedgerError, match="not signed by this federation's aggregator"):
        ledger.accept_receipt(_receipt(ledger, impostor))
    with pytest.raises(LedgerError, match="is for site 'b', not 'a'"):
        ledger.accept_receipt(_receipt(ledger, key, site_id="b"))
    tampered = _receipt(ledger, key).replace('"count":3', '"count":1')
    with pytest.raises(LedgerError, match="bad signature"):
        ledger.accept_receipt(tampered)
    with pytest.raises(LedgerError, match="is not a ledger receipt"):
        ledger.accept_receipt("{}")
    assert not receipt_path(ledger.path).exists()


def test_an_older_receipt_never_replaces_a_newer_one(tmp_path: Path) -> None:
    key = _aggregator_key(tmp_path)
    ledger = _ledger(tmp_path, key)
    _spend(ledger, 0)
    first = _receipt(ledger, key)
    _spend(ledger, 1)
    ledger.accept_receipt(_receipt(ledger, key))
    ledger.accept_receipt(first)  # an aggregator behind the site: accepted, kept receipt stays
    assert ledger.receipts is not None
    kept = ledger.receipts.load()
    assert kept is not None and kept.count == 5


def _federated_site(tmp_path: Path, key: Ed25519PrivateKey) -> SiteConfig:
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "aggregator_receipt.pub").write_bytes(spki_pem(key.public_key()))
    base = policy_site(tmp_path)
    return SiteConfig.model_validate(
        {
            **base.model_dump(mode="python"),
            "transport": {
                "superlink_address": "127.0.0.1:9092",
                "root_certificates": str(kit / "ca.crt"),  # receipt key found beside it
                "node_private_key": str(kit / "node_key"),
                "node_public_key": str(kit / "node_key.pub"),
            },
        }
    )


def test_a_round_is_declined_before_anything_is_reserved(tmp_path: Path) -> None:
    from medfed.site.federated import train_round
    from medfed.site.ledger_of import ledger_of

    key = _aggregator_key(tmp_path)
    config = _federated_site(tmp_path, key)
    ledger = ledger_of(config)
    assert ledger.receipts is not None  # the kit's key, found beside its CA certificate
    _spend(ledger, 0)
    old_ledger, old_head = ledger.path.read_bytes(), head_path(ledger.path).read_bytes()
    _spend(ledger, 1)
    receipt = _receipt(ledger, key, site_id=config.site_id)
    ledger.path.write_bytes(old_ledger)
    head_path(ledger.path).write_bytes(old_head)
    before = ledger.path.read_bytes()
    request = round_request(
        weights={}, ledger_known=5, ledger_receipt=receipt, run_name="run-1", round=2
    )
    with pytest.raises(LedgerError, match="rolled back"):
        train_round(config=config, request=request)
    assert ledger.path.read_bytes() == before  # nothing reserved, nothing read


def test_site_check_reports_the_receipt_and_fails_a_rolled_back_ledger(tmp_path: Path) -> None:
    from medfed.site.ledger_of import ledger_of
    from medfed.site.preflight import check_ledger, check_receipt

    assert check_receipt(policy_site(tmp_path / "plain")).status == "WARN"  # no receipt key
    key = _aggregator_key(tmp_path)
    config = _federated_site(tmp_path, key)
    assert "none kept yet" in check_receipt(config).detail
    ledger = ledger_of(config)
    _spend(ledger, 0)
    old_ledger, old_head = ledger.path.read_bytes(), head_path(ledger.path).read_bytes()
    _spend(ledger, 1)
    ledger.accept_receipt(_receipt(ledger, key, site_id=config.site_id))
    result = check_receipt(config)
    assert result.status == "PASS" and "holds 5 entries" in result.detail
    assert all(r.status != "FAIL" for r in check_ledger(config))
    ledger.path.write_bytes(old_ledger)
    head_path(ledger.path).write_bytes(old_head)
    failed = {r.name: r.detail for r in check_ledger(config) if r.status == "FAIL"}
    assert "rolled back" in failed["ledger"] and str(receipt_path(ledger.path)) in failed["ledger"]
    assert failed["privacy budget"] == "unknown: the ledger does not verify"
