"""Site configuration: strict keys, every problem at once, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.config import SiteConfig, dump_site_config, load_site_config
from medfed.errors import ConfigError

GOOD = """\
site_id: hospital-a
data:
  manifest: data/manifest.csv
  patch_size: [32, 32, 32]
privacy:
  noise_multiplier: 1.1
  epsilon_cap: 4.0
paths:
  workdir: state
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_with_paths_resolved_against_the_file(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, GOOD))
    assert config.site_id == "hospital-a"
    assert config.data.manifest == (tmp_path / "data" / "manifest.csv").resolve()
    assert config.paths.workdir == (tmp_path / "state").resolve()
    assert config.ledger_path == (tmp_path / "state" / "ledger.jsonl").resolve()
    assert config.signing_key_path.name == "ledger_ed25519.pem"
    assert config.spatial_dims == 3
    assert config.privacy.noise_multiplier == 1.1
    assert config.privacy.accountant == "rdp"


def test_every_unknown_key_at_every_level_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("site_id: hospital-a", "site_id: hospital-a\ncolour: blue")
    text = text.replace("  noise_multiplier: 1.1", "  noise_multipler: 1.1\n  noise_multiplier: 1")
    text = text.replace("  workdir: state", "  workdir: state\n  wrokdir: x")
    with pytest.raises(ConfigError) as info:
        load_site_config(_write(tmp_path, text))
    message = info.value.message
    assert "3 problems" in message
    for key in ("colour", "privacy.noise_multipler", "paths.wrokdir"):
        assert f"{key}: unknown setting" in message
    assert str(tmp_path / "site.yaml") in message


def test_bad_values_are_named(tmp_path: Path) -> None:
    text = GOOD.replace("[32, 32, 32]", "[32, 2, 32]").replace(
        "epsilon_cap: 4.0", "epsilon_cap: -1"
    )
    with pytest.raises(ConfigError) as info:
        load_site_config(_write(tmp_path, text))
    assert "data" in info.value.message and "privacy.epsilon_cap" in info.value.message


def test_exactly_one_noise_setting(tmp_path: Path) -> None:
    both = GOOD.replace(
        "  noise_multiplier: 1.1", "  noise_multiplier: 1.1\n  target_epsilon_per_round: 1"
    )
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier"):
        load_site_config(_write(tmp_path, both))
    target = GOOD.replace("noise_multiplier: 1.1", "target_epsilon_per_round: 1.5")
    assert load_site_config(_write(tmp_path, target)).privacy.target_epsilon_per_round == 1.5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("site_id: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_unreadable_files_give_config_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_site_config(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    config = SiteConfig.model_validate(
        {"site_id": "b", "data": {"manifest": "m.csv"}, "privacy": {"noise_multiplier": 2.0}}
    )
    path = tmp_path / "out.yaml"
    dump_site_config(config, path)
    again = load_site_config(path)
    assert again.privacy == config.privacy
    assert again.data.manifest == (tmp_path / "m.csv").resolve()


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "sites" / "site.example.yaml"
    config = load_site_config(example)
    assert config == load_site_config(example)
    assert (
        config.training.grad_sample_mode
        == SiteConfig.model_fields["training"].default.grad_sample_mode
    )


def test_patch_size_must_fit_the_network_downsampling(tmp_path: Path) -> None:
    text = GOOD.replace("[32, 32, 32]", "[32, 30, 32]")
    with pytest.raises(ConfigError, match="divisible by 4"):
        load_site_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("address", "ok"),
    [("agg.hospital.org:8000", True), ("[::1]:8000", True), ("agg:port", False), ("agg", False)],
)
def test_transport_address_must_be_host_and_port(tmp_path: Path, address: str, ok: bool) -> None:
    text = GOOD + (
        f"transport:\n  superlink_address: '{address}'\n  root_certificates: kit/ca.crt\n"
        "  node_private_key: kit/node_key\n  node_public_key: kit/node_key.pub\n"
    )
    if ok:
        config = load_site_config(_write(tmp_path, text))
        assert config.transport is not None
        assert config.transport.node_private_key == (tmp_path / "kit" / "node_key").resolve()
    else:
        with pytest.raises(ConfigError, match=r"transport\.superlink_address"):
            load_site_config(_write(tmp_path, text))
