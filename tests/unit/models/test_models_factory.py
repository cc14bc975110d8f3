"""build_model: MONAI networks in 2D and 3D that Opacus accepts, deterministic under a seed."""

from __future__ import annotations

import pytest
import torch
from models_support import default_spec
from torch import nn

from medfed.errors import ModelError
from medfed.models import build_model, memory_format_for, place_model
from medfed.models.factory import check_dp_compatible, group_norm_groups, parameter_shapes


@pytest.mark.parametrize("network", ["unet", "attention_unet"])
@pytest.mark.parametrize("norm", ["instance", "group"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_networks_build_validate_and_keep_the_input_size(
    network: str, norm: str, spatial_dims: int
) -> None:
    from opacus.validators import ModuleValidator

    spec = default_spec(spatial_dims, network=network, norm=norm, out_channels=3)
    model = build_model(spec=spec)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        out = model(torch.zeros((2, 1, *([8] * spatial_dims))))
    assert out.shape == (2, 3, *([8] * spatial_dims))


def test_default_unet_has_affine_instance_norm_prelu_and_transposed_convs() -> None:
    model = build_model(spec=default_spec(3))
    kinds = {type(m) for m in model.modules()}
    assert {nn.InstanceNorm3d, nn.PReLU, nn.ConvTranspose3d, nn.Conv3d} <= kinds
    assert all(m.affine for m in model.modules() if isinstance(m, nn.InstanceNorm3d))
    assert sum(p.numel() for p in model.parameters()) == 35034


def test_group_norm_groups_divide_every_normalised_width() -> None:
    spec = default_spec(3, norm="group")
    assert group_norm_groups(spec) == 2
    model = build_model(spec=spec)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert group_norm_groups(default_spec(3, norm="group", channels=(16, 32, 64), out_channels=4))
    assert group_norm_groups(default_spec(3, channels=(16, 32, 64), out_channels=8)) == 8


def test_initialisation_is_deterministic_under_a_seed() -> None:
    spec = default_spec(2)
    torch.manual_seed(7)
    first = build_model(spec=spec).state_dict()
    torch.manual_seed(7)
    second = build_model(spec=spec).state_dict()
    torch.manual_seed(8)
    third = build_model(spec=spec).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_parameter_shapes_match_a_built_model_without_touching_the_rng() -> None:
    spec = default_spec(3, network="attention_unet")
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    shapes = parameter_shapes(spec=spec)
    assert torch.equal(before, torch.random.get_rng_state())
    built = build_model(spec=spec).state_dict()
    assert shapes == {k: tuple(v.shape) for k, v in built.items()}


def test_dp_incompatible_layers_are_all_listed_with_the_fix() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    with pytest.raises(ModelError, match=r"\(2 problems\)") as info:
        check_dp_compatible(model)
    assert info.value.hint is not None and "GroupNorm" in info.value.hint


def test_monai_refusing_a_spec_becomes_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(spec: object) -> nn.Module:
        raise ValueError("the sizes do not add up")

    monkeypatch.setattr("medfed.models.factory._build", refuse)
    with pytest.raises(ModelError, match=r"cannot build unet .*the sizes do not add up"):
        build_model(spec=default_spec(3))


def test_place_model_uses_channels_last_on_cpu() -> None:
    spec = default_spec(3)
    assert memory_format_for(spec=spec, device=torch.device("cpu")) == torch.channels_last_3d
    assert memory_format_for(spec=default_spec(2), device=torch.device("cpu")) == (
        torch.channels_last
    )
    assert memory_format_for(spec=spec, device=torch.device("cuda")) == torch.contiguous_format
    model = place_model(model=build_model(spec=spec), spec=spec, device=torch.device("cpu"))
    weight = model.get_parameter("model.1.submodule.0.conv.unit0.conv.weight")
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not weight.is_contiguous()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
