"""A site's secure aggregation stages, with three real sites' keys and state files, no data."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from site_support import round_request

from medfed.config.site import SiteConfig
from medfed.envelope import RoundRequest
from medfed.errors import SecureAggregationError
from medfed.privacy.keys import load_or_create_signing_key
from medfed.secagg import UnmaskRequest, wire
from medfed.site.secure_round import (
    advertise,
    open_received,
    share,
    state_dir,
    unmask,
)

SITES = ("site-a", "site-b", "site-c")


def _site(tmp_path: Path, site_id: str) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "site_id": site_id,
            "data": {"manifest": str(tmp_path / site_id / "missing" / "manifest.csv")},
            "paths": {"workdir": str(tmp_path / site_id / "work")},
        }
    )


def _raw(config: SiteConfig) -> str:
    key = load_or_create_signing_key(config.signing_key_path).public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _request(payload: dict[str, Any]) -> RoundRequest:
    return round_request(secure_aggregation=json.loads(json.dumps(payload)))


def _keys(configs: dict[str, SiteConfig]) -> dict[str, dict[str, Any]]:
    ledger_keys = {site: _raw(config) for site, config in configs.items()}
    payload = {"epoch": 1, "rounds": [1, 2, 3], "ledger_keys": ledger_keys}
    return {
        site: dict(advertise(config=config, request=_request(payload)).payload["bundle"])
        for site, config in configs.items()
    }


def _shares(
    configs: dict[str, SiteConfig], bundles: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    payload = {"epoch": 1, "bundles": bundles}
    return {
        site: dict(share(config=config, request=_request(payload)).payload)
        for site, config in configs.items()
    }


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, SiteConfig]:
    return {site: _site(tmp_path, site) for site in SITES}


def test_three_sites_agree_keys_share_and_open(configs: dict[str, SiteConfig]) -> None:
    bundles = _keys(configs)
    # asked again (a restarted ClientApp), a site advertises the same keys
    assert _keys(configs) == bundles
    answers = _shares(configs, list(bundles.values()))
    assert all(answer["excluded"] == {} for answer in answers.values())
    for site, config in configs.items():
        incoming = [e for a in answers.values() for e in a["shares"] if e["recipient"] == site]
        assert len(incoming) == 2
        opened = open_received(config=config, request=_request({"epoch": 1, "shares": incoming}))
        assert opened.payload["members"] == list(SITES)
        directory = state_dir(config, "study")
        for path in directory.glob("epoch-*.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_forged_bundle_is_excluded_and_named_by_the_others(
    configs: dict[str, SiteConfig],
) -> None:
    bundles = _keys(configs)
    forged = dict(bundles["site-c"])
    other = bytes.fromhex(bundles["site-a"]["mask_public"])
    forged["mask_public"] = other[::-1].hex()  # the aggregator swaps in a key of its own
    answers = _shares(
        {s: configs[s] for s in ("site-a", "site-b")},
        [bundles["site-a"], bundles["site-b"], forged],
    )
    for answer in answers.values():
        assert list(answer["excluded"]) == ["site-c"]
        assert "signature does not verify" in answer["excluded"]["site-c"]
        assert {e["recipient"] for e in answer["shares"]} <= {"site-a", "site-b"}


def test_a_changed_ledger_key_for_a_known_site_is_refused(
    configs: dict[str, SiteConfig], tmp_path: Path
) -> None:
    _keys(configs)
    impostor = _site(tmp_path / "other", "site-b")
    keys = {site: _raw(config) for site, config in configs.items()}
    keys["site-b"] = _raw(impostor)
    payload = {"epoch": 2, "rounds": [4], "ledger_keys": keys}
    with pytest.raises(SecureAggregationError, match=r"\['site-b'\] differ from the keys"):
        advertise(config=configs["site-a"], request=_request(payload))
    keys["site-a"] = _raw(impostor)
    with pytest.raises(SecureAggregationError, match="own ledger key"):
        advertise(config=configs["site-a"], request=_request(payload))


def _opened(configs: dict[str, SiteConfig]) -> None:
    bundles = _keys(configs)
    answers = _shares(configs, list(bundles.values()))
    for site, config in configs.items():
        incoming = [e for a in answers.values() for e in a["shares"] if e["recipient"] == site]
        open_received(config=config, request=_request({"epoch": 1, "shares": incoming}))


def test_unmasking_answers_and_records_what_it_revealed(configs: dict[str, SiteConfig]) -> None:
    _opened(configs)
    asked = UnmaskRequest(
        run_id="study", epoch=1, round=1, survivors=("site-a", "site-b"), dropped=("site-c",)
    )
    payload = {"epoch": 1, "request": wire.request_to_json(asked)}
    reply = unmask(config=configs["site-a"], request=_request(payload))
    answer = wire.answer_from_json(reply.payload["answer"])
    assert set(answer.self_seed_shares) == {"site-a", "site-b"}
    assert set(answer.pair_keys) == {"site-c"}
    # the record is on disk: a restarted ClientApp refuses what would unmask site-b
    both = UnmaskRequest(
        run_id="study", epoch=1, round=1, survivors=("site-a", "site-c"), dropped=("site-b",)
    )
    with pytest.raises(SecureAggregationError, match="refuses to reveal"):
        unmask(
            config=configs["site-a"],
            request=_request({"epoch": 1, "request": wire.request_to_json(both)}),
        )


def test_a_site_called_dropped_reveals_nothing(configs: dict[str, SiteConfig]) -> None:
    _opened(configs)
    asked = UnmaskRequest(
        run_id="study", epoch=1, round=1, survivors=("site-b", "site-c"), dropped=("site-a",)
    )
    with pytest.raises(SecureAggregationError, match="calls this site dropped"):
        unmask(
            config=configs["site-a"],
            request=_request({"epoch": 1, "request": wire.request_to_json(asked)}),
        )


def test_a_stage_before_the_keys_is_refused(configs: dict[str, SiteConfig]) -> None:
    with pytest.raises(SecureAggregationError, match="has no keys for key epoch 1"):
        share(config=configs["site-a"], request=_request({"epoch": 1, "bundles": []}))


def test_a_distributed_noise_round_is_not_unmasked_with_fewer_shares_than_counted_on(
    configs: dict[str, SiteConfig],
) -> None:
    _opened(configs)
    # site-a masked round 1 with a noise share that counts on all three sites' shares
    path = state_dir(configs["site-a"], "study") / "epoch-0001.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "distributed": {"1": 3}}))
    asked = UnmaskRequest(
        run_id="study", epoch=1, round=1, survivors=("site-a", "site-b"), dropped=("site-c",)
    )
    payload = {"epoch": 1, "request": wire.request_to_json(asked)}
    with pytest.raises(SecureAggregationError, match="counts on 3 sites' shares in the sum"):
        unmask(config=configs["site-a"], request=_request(payload))
    # the same request for a round without distributed noise is answered
    other = UnmaskRequest(
        run_id="study", epoch=1, round=2, survivors=("site-a", "site-b"), dropped=("site-c",)
    )
    payload = {"epoch": 1, "request": wire.request_to_json(other)}
    assert unmask(config=configs["site-a"], request=_request(payload)).payload["answer"]
