"""ModelSpec: JSON round trip, every bad field reported at once, derived from the site config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medfed.config import DataSection, ModelSection, SiteConfig
from medfed.errors import ModelError
from medfed.models import ModelSpec, spec_from_config

DEFAULT_3D = ModelSpec(
    network="unet",
    spatial_dims=3,
    in_channels=1,
    out_channels=2,
    channels=(8, 16, 32),
    strides=(2, 2),
    num_res_units=1,
    norm="instance",
)


def _config(**data: Any) -> SiteConfig:
    return SiteConfig(site_id="a", data=DataSection(manifest=Path("m.csv"), **data))


def test_spec_round_trips_through_dict_and_json() -> None:
    assert ModelSpec.from_dict(DEFAULT_3D.to_dict()) == DEFAULT_3D
    assert ModelSpec.from_json(DEFAULT_3D.to_json()) == DEFAULT_3D
    assert DEFAULT_3D.to_dict()["channels"] == [8, 16, 32]  # JSON-ready lists


def test_spec_is_frozen_hashable_and_normalises_lists_to_tuples() -> None:
    spec = ModelSpec(**{**DEFAULT_3D.to_dict(), "channels": [8, 16, 32], "strides": [2, 2]})
    assert spec == DEFAULT_3D and hash(spec) == hash(DEFAULT_3D)
    with pytest.raises(AttributeError):
        spec.norm = "group"  # type: ignore[misc]


def test_from_dict_names_every_bad_field_in_one_error() -> None:
    bad = {
        **DEFAULT_3D.to_dict(),
        "network": "segresnet",
        "spatial_dims": 4,
        "out_channels": 1,
        "channels": [8, 0],
        "num_res_units": True,
        "norm": "batch",
        "dropout": 0.1,
    }
    del bad["in_channels"]
    with pytest.raises(ModelError) as info:
        ModelSpec.from_dict(bad, source="ckpt/model.json")
    message = info.value.message
    assert message.startswith("ckpt/model.json:")
    for text in (
        "network: must be one of unet, attention_unet",
        "spatial_dims: must be 2 or 3",
        "out_channels: must be an integer >= 2",
        "channels: must be a list",
        "num_res_units: must be an integer >= 0",
        "norm: must be one of instance, group",
        "dropout: unknown field",
        "in_channels: missing",
    ):
        assert text in message, text


def test_strides_must_match_channels() -> None:
    with pytest.raises(ModelError, match="one entry fewer than channels"):
        ModelSpec(**{**DEFAULT_3D.to_dict(), "strides": (2, 2, 2)})


def test_from_json_rejects_garbage_and_non_mappings() -> None:
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelSpec.from_json("{network: unet")
    with pytest.raises(ModelError, match="expected a mapping"):
        ModelSpec.from_json("[1, 2]")


def test_spec_from_default_config_is_the_default_3d_network() -> None:
    assert spec_from_config(_config()) == DEFAULT_3D
    assert ModelSpec.from_config(_config()) == DEFAULT_3D


def test_spec_from_config_follows_classes_patch_size_and_model_section() -> None:
    config = SiteConfig(
        site_id="a",
        data=DataSection(manifest=Path("m.csv"), classes=[0, 1, 2], patch_size=[64, 64]),
        model=ModelSection(network="attention_unet", channels=[4, 8], strides=[2], norm="group"),
    )
    spec = spec_from_config(config)
    assert (spec.spatial_dims, spec.out_channels, spec.network) == (2, 3, "attention_unet")
    assert (spec.channels, spec.strides, spec.norm) == ((4, 8), (2,), "group")


def test_spec_from_config_rejects_patch_sizes_the_network_cannot_reproduce() -> None:
    # SiteConfig validates this too; a config assembled without validation must not slip by.
    config = _config()
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"patch_size": [32, 30, 32]})}
    )
    with pytest.raises(ModelError, match="divisible by 4") as info:
        spec_from_config(config)
    assert info.value.hint is not None and "[32, 32, 32]" in info.value.hint
