"""A bad site config names the line of every bad key or value, and the key that was meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.config import load_site_config
from medfed.errors import ConfigError

BAD = """\
site_id: hospital-a
colour: blue
data:
  manifest: data/manifest.csv
  patch_size: [32, 2, 32]
privacy:
  noise_multipler: 1.1
  noise_multiplier: 1
  epsilon_cap: -1
paths:
  wrokdir: x
policy:
  allowed_networks:
    - unet
    - resnet
"""


@pytest.fixture
def problems(tmp_path: Path) -> list[str]:
    path = tmp_path / "site.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    head, *lines = caught.value.message.splitlines()
    assert head == f"{len(lines)} problems in site config:"
    prefix = f"{path}:"
    assert all(line.startswith(prefix) for line in lines)
    return [line.removeprefix(prefix) for line in lines]


def test_every_problem_names_its_line(problems: list[str]) -> None:
    assert sorted(problems, key=lambda p: int(p.split(":")[0])) == [
        "2: colour: unknown setting",
        "3: data: Value error, every patch_size entry must be at least 4 voxels",
        "7: privacy.noise_multipler: unknown setting; did you mean noise_multiplier?",
        "9: privacy.epsilon_cap: Input should be greater than 0",
        "11: paths.wrokdir: unknown setting; did you mean workdir?",
        "15: policy.allowed_networks.1: Input should be 'unet' or 'attention_unet'",
    ]


def test_a_missing_key_names_the_section_that_lacks_it(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("site_id: a\nprivacy:\n  noise_multiplier: 1.0\ndata:\n  patch_size: [32]\n")
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert f"{path}:4: data.manifest: Field required" in caught.value.message


def test_a_top_level_key_that_is_missing_has_no_line(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("data:\n  manifest: m.csv\nprivacy:\n  noise_multiplier: 1.0\n")
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert f"{path}: site_id: Field required" in caught.value.message
