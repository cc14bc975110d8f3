"""Key bundles signed with the sites' ledger keys: forged, unsigned or foreign ones are excluded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from secagg_support import EPOCH, RUN, advertise_keys, seeded_bytes

from medfed.errors import ConfigError, SecureAggregationError
from medfed.privacy.keys import load_or_create_signing_key, load_public_key, public_key_path
from medfed.secagg import KeyBundle, advertise, new_site_secrets, verify_bundles
from medfed.secagg.keys import signed_message

SITES = ("site-a", "site-b", "site-c")
# A point of order 8 on Curve25519 (RFC 7748 test material): every agreement with it is zero.
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def test_bundles_signed_with_ledger_keys_from_disk_verify(tmp_path: Path) -> None:
    bundles, ledger_keys = [], {}
    for site in SITES:
        key_path = tmp_path / site / "ledger.key"
        signing_key = load_or_create_signing_key(key_path)
        ledger_keys[site] = load_public_key(public_key_path(key_path))
        secrets = new_site_secrets(site_id=site, run_id=RUN, epoch=EPOCH, rounds=(1, 2))
        bundles.append(advertise(secrets=secrets, ledger_key=signing_key))
    roster = verify_bundles(bundles=bundles, ledger_keys=ledger_keys, run_id=RUN, epoch=EPOCH)
    assert roster.sites == SITES
    assert dict(roster.excluded) == {}
    assert roster.threshold == 2
    assert [roster.point_of(site) for site in SITES] == [1, 2, 3]


def _forge_b(bundle: KeyBundle) -> KeyBundle:
    """The aggregator swaps site-b's mask key for one of its own: the signature no longer fits."""
    if bundle.site_id != "site-b":
        return bundle
    return replace(bundle, mask_public=bytes(reversed(bundle.mask_public)))


def test_a_forged_bundle_is_excluded_and_named() -> None:
    fed = advertise_keys(SITES, forge=_forge_b)
    roster = fed.aggregator_roster
    assert roster.sites == ("site-a", "site-c")
    assert dict(roster.excluded) == {
        "site-b": "the key bundle's signature does not verify under the site's ledger key"
    }
    assert all(r.sites == roster.sites for r in fed.rosters.values())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"signature": None}, "the key bundle has no signature"),
        ({"signature": b""}, "the key bundle has no signature"),
        ({"signature": bytes(64)}, "signature does not verify"),
        ({"epoch": EPOCH + 1}, "signature does not verify"),
    ],
)
def test_unsigned_or_altered_bundles_are_excluded(change: dict[str, object], reason: str) -> None:
    fed = advertise_keys(SITES)
    bundles = [replace(b, **change) if b.site_id == "site-c" else b for b in fed.bundles]  # type: ignore[arg-type]
    roster = verify_bundles(
        bundles=bundles, ledger_keys=fed.public_ledger_keys, run_id=RUN, epoch=EPOCH
    )
    assert roster.sites == ("site-a", "site-b")
    assert reason in roster.excluded["site-c"]


def test_a_bundle_signed_by_another_sites_key_is_excluded() -> None:
    fed = advertise_keys(SITES)
    secrets = new_site_secrets(site_id="site-c", run_id=RUN, epoch=EPOCH, rounds=(1,))
    impostor = advertise(secrets=secrets, ledger_key=fed.ledger_keys["site-a"])
    bundles = [b for b in fed.bundles if b.site_id != "site-c"] + [impostor]
    roster = verify_bundles(
        bundles=bundles, ledger_keys=fed.public_ledger_keys, run_id=RUN, epoch=EPOCH
    )
    assert "signature does not verify" in roster.excluded["site-c"]


def test_properly_signed_bundles_of_another_epoch_unknown_sites_and_silence_are_named() -> None:
    fed = advertise_keys(SITES)
    stranger_key = Ed25519PrivateKey.generate()
    stranger = advertise(
        secrets=new_site_secrets(site_id="site-x", run_id=RUN, epoch=EPOCH, rounds=(1,)),
        ledger_key=stranger_key,
    )
    old = advertise(
        secrets=new_site_secrets(site_id="site-b", run_id=RUN, epoch=EPOCH - 1, rounds=(1,)),
        ledger_key=fed.ledger_keys["site-b"],
    )
    bundles = [fed.bundles[0], old, stranger]
    roster_keys = fed.public_ledger_keys
    with pytest.raises(SecureAggregationError, match="1 key bundle\\(s\\) verified, 2 needed"):
        verify_bundles(bundles=bundles, ledger_keys=roster_keys, run_id=RUN, epoch=EPOCH)
    roster = verify_bundles(
        bundles=[*fed.bundles[:2], stranger], ledger_keys=roster_keys, run_id=RUN, epoch=EPOCH
    )
    assert dict(roster.excluded) == {
        "site-c": "sent no key bundle",
        "site-x": "no ledger key is known for this site",
    }
    roster = verify_bundles(
        bundles=[fed.bundles[0], fed.bundles[2], old],
        ledger_keys=roster_keys,
        run_id=RUN,
        epoch=EPOCH,
    )
    assert roster.excluded["site-b"] == f"the key bundle is for run {RUN} epoch {EPOCH - 1}"


@pytest.mark.parametrize("point", [LOW_ORDER, bytes(32), b"short"])
def test_duplicate_bundles_and_unusable_keys_are_excluded(point: bytes) -> None:
    sites = ("site-a", "site-b", "site-c", "site-d")
    fed = advertise_keys(sites)
    a, b, c, d = fed.bundles
    second_a = advertise(
        secrets=new_site_secrets(site_id="site-a", run_id=RUN, epoch=EPOCH, rounds=(1,)),
        ledger_key=fed.ledger_keys["site-a"],
    )
    resigned = {}
    for bundle, change in ((c, {"mask_public": point}), (d, {"share_public": d.mask_public})):
        unsigned = replace(bundle, signature=None, **change)  # type: ignore[arg-type]
        key = fed.ledger_keys[bundle.site_id]
        resigned[bundle.site_id] = replace(unsigned, signature=key.sign(signed_message(unsigned)))
    with pytest.raises(SecureAggregationError, match="site-a: sent 2 key bundles"):
        verify_bundles(
            bundles=[a, second_a, b, *resigned.values()],
            ledger_keys=fed.public_ledger_keys,
            run_id=RUN,
            epoch=EPOCH,
        )
    roster = verify_bundles(
        bundles=[a, b, *resigned.values()],
        ledger_keys=fed.public_ledger_keys,
        run_id=RUN,
        epoch=EPOCH,
    )
    assert roster.sites == ("site-a", "site-b")
    assert dict(roster.excluded) == {
        "site-c": "the mask public key is not a usable X25519 key",
        "site-d": "the mask and share public keys are the same key",
    }


def test_keys_and_seeds_are_fresh_and_never_printed() -> None:
    first = new_site_secrets(site_id="site-a", run_id=RUN, epoch=EPOCH, rounds=(1, 2, 3))
    second = new_site_secrets(site_id="site-a", run_id=RUN, epoch=EPOCH, rounds=(1, 2, 3))
    assert first.mask_key_bytes() != second.mask_key_bytes()
    assert len(set(first.self_seeds.values())) == 3
    text = repr(first)
    assert first.mask_key_bytes().hex() not in text and "self_seeds" not in text
    assert "mask_key" not in text


def test_an_epoch_needs_distinct_rounds() -> None:
    with pytest.raises(ConfigError, match="must be distinct and not empty"):
        new_site_secrets(site_id="site-a", run_id=RUN, epoch=EPOCH, rounds=(1, 1))
    with pytest.raises(ConfigError):
        new_site_secrets(
            site_id="site-a", run_id=RUN, epoch=EPOCH, rounds=(), random_bytes=seeded_bytes(0)
        )
