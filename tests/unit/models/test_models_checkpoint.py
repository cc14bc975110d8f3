"""Checkpoints: safetensors + JSON manifest, plain names, strict and explicit on every failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models_support import default_spec
from torch import nn

from medfed.errors import ModelError
from medfed.models import build_model, load_checkpoint, place_model, save_checkpoint
from medfed.models.checkpoint import MANIFEST_NAME, WEIGHTS_NAME


def _trained_model(spatial_dims: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(spec=default_spec(spatial_dims))
    with torch.no_grad():
        for parameter in model.parameters():  # move away from the fresh-init values
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def _outputs(model: nn.Module, spatial_dims: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out: torch.Tensor = model(
            torch.linspace(-1, 1, 2 * 16**spatial_dims).reshape(2, 1, *[16] * spatial_dims)
        )
    return out


def test_round_trip_gives_the_same_network_spec_and_metadata(tmp_path: Path) -> None:
    model = _trained_model()
    spec = default_spec(2)
    metadata = {"site": "hospital-a", "round": 3, "epsilon": 1.25, "tags": ["dp"]}
    returned = save_checkpoint(
        directory=tmp_path / "ckpt", model=model, spec=spec, metadata=metadata
    )
    assert returned == tmp_path / "ckpt"
    assert sorted(p.name for p in returned.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    loaded, loaded_spec, loaded_metadata = load_checkpoint(path=returned)
    assert loaded_spec == spec and loaded_metadata == metadata
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    # Either file names the checkpoint too.
    assert load_checkpoint(path=returned / WEIGHTS_NAME).spec == spec
    manifest = json.loads((returned / MANIFEST_NAME).read_text())
    assert manifest["spec"] == spec.to_dict() and len(manifest["weights"]["sha256"]) == 64


def test_opacus_wrapped_and_channels_last_models_save_plain_names(tmp_path: Path) -> None:
    from opacus import GradSampleModule

    spec = default_spec(3)
    model = place_model(model=_trained_model(3), spec=spec, device=torch.device("cpu"))
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    assert all(key.startswith("_module.") for key in wrapped.state_dict())
    save_checkpoint(directory=tmp_path, model=wrapped, spec=spec, metadata={})
    loaded = load_checkpoint(path=tmp_path).model
    assert isinstance(loaded, type(model)) and not isinstance(loaded, GradSampleModule)
    torch.testing.assert_close(_outputs(loaded, 3), _outputs(model, 3), rtol=1e-6, atol=1e-6)


def test_saving_replaces_the_previous_checkpoint_and_leaves_no_temporary_files(
    tmp_path: Path,
) -> None:
    spec = default_spec(2)
    save_checkpoint(directory=tmp_path, model=build_model(spec=spec), spec=spec, metadata={"r": 1})
    save_checkpoint(directory=tmp_path, model=_trained_model(), spec=spec, metadata={"r": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    assert load_checkpoint(path=tmp_path).metadata == {"r": 2}


def test_model_that_does_not_match_its_spec_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not match its spec.*shape"):
        save_checkpoint(
            directory=tmp_path / "c", model=_trained_model(), spec=default_spec(3), metadata={}
        )
    assert not (tmp_path / "c").exists()


def test_metadata_must_be_json(tmp_path: Path) -> None:
    spec = default_spec(2)
    with pytest.raises(ModelError, match="not JSON-serialisable"):
        save_checkpoint(
            directory=tmp_path, model=_trained_model(), spec=spec, metadata={"p": Path()}
        )


def _saved(tmp_path: Path) -> Path:
    spec = default_spec(2)
    return save_checkpoint(directory=tmp_path / "ckpt", model=_trained_model(), spec=spec)


def test_corrupt_weights_are_a_model_error_naming_the_file(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"{weights}: weights do not match the manifest"):
        load_checkpoint(path=directory)


def test_garbage_safetensors_with_a_matching_hash_is_reported(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    import hashlib

    manifest["weights"]["sha256"] = hashlib.sha256(
        (directory / WEIGHTS_NAME).read_bytes()
    ).hexdigest()
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="corrupt safetensors file"):
        load_checkpoint(path=directory)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"channels": [8, 16, 64]}, ["shape [32, 16, 3, 3], expected [64, 16, 3, 3]"]),
        (
            {"num_res_units": 0},
            ["missing keys: model.0.adn.A.weight", "unexpected keys: model.0.conv"],
        ),
    ],
)
def test_weights_for_another_spec_name_every_mismatch(
    tmp_path: Path, change: dict[str, object], expected: list[str]
) -> None:
    directory = _saved(tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["spec"].update(change)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="weights do not fit the spec") as info:
        load_checkpoint(path=directory)
    for text in expected:
        assert text in info.value.message


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / MANIFEST_NAME).unlink(), "manifest not found"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "weights not found"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "unreadable checkpoint manifest"),
        (lambda d: (d / MANIFEST_NAME).write_text("{}"), "not a medfed checkpoint"),
    ],
)
def test_missing_or_unreadable_files_are_model_errors(
    tmp_path: Path, damage: object, expected: str
) -> None:
    directory = _saved(tmp_path)
    damage(directory)  # type: ignore[operator]
    with pytest.raises(ModelError, match=expected):
        load_checkpoint(path=directory)


def test_a_bad_spec_in_the_manifest_names_the_manifest(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["spec"]["norm"] = "batch"
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=f"{directory / MANIFEST_NAME}: invalid model spec"):
        load_checkpoint(path=directory)


def test_unrelated_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "weights.pt"
    other.write_bytes(b"")
    with pytest.raises(ModelError, match="not a checkpoint"):
        load_checkpoint(path=other)
