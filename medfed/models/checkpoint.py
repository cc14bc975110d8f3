"""Checkpoints of torch networks: the format of :mod:`medfed.model_files` (safetensors and a
JSON manifest), written from a network and read back into one.

Nothing is ever pickled or read with ``torch.load``: a checkpoint may come from another site.
The weights are checked against the network's spec when saved and when loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from medfed.errors import ModelError
from medfed.model_files import MANIFEST_NAME, WEIGHTS_NAME, read_model, write_model
from medfed.models.factory import build_model, parameter_shapes
from medfed.models.spec import ModelSpec

# GradSampleModule (Opacus) and torch.compile wrap the network and prefix its parameter names.
_WRAPPER_PREFIXES = ("_module.", "_orig_mod.")


class LoadedCheckpoint(NamedTuple):
    """A rebuilt network with the spec and metadata it was saved with."""

    model: nn.Module
    spec: ModelSpec
    metadata: dict[str, Any]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside an Opacus GradSampleModule (hooks add cost at inference)."""
    inner = getattr(module, "_module", None)
    return inner if isinstance(inner, nn.Module) else module


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The network's tensors under the names a plain (unwrapped) module uses, on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        # safetensors stores dense row-major data: channels-last weights must be repacked.
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def _mismatches(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    problems += [
        f"{key}: shape {list(found[key])}, expected {list(expected[key])}"
        for key in sorted(set(found) & set(expected))
        if tuple(found[key]) != tuple(expected[key])
    ]
    return problems


def save_checkpoint(
    *,
    directory: Path | str,
    model: nn.Module,
    spec: ModelSpec,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and ``spec`` (+ JSON-able ``metadata``) to ``directory``.

    ``model`` may be wrapped by Opacus; the saved names are always the plain network's, so the
    checkpoint loads into a freshly built model. The weights are checked against ``spec``
    before anything is written. Returns the directory.
    """
    state = plain_state_dict(model)
    problems = _mismatches(
        {key: tuple(t.shape) for key, t in state.items()}, parameter_shapes(spec=spec)
    )
    if problems:
        raise ModelError(
            f"model does not match its spec {spec.to_json()}: " + "; ".join(problems),
            hint="save the network that build_model(spec=...) built for this spec",
        )
    return _write_checkpoint(Path(directory), state, spec, metadata)


def _write_checkpoint(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    metadata: Mapping[str, Any] | None,
) -> Path:
    return write_model(
        directory,
        weights={name: tensor.numpy() for name, tensor in state.items()},
        spec=spec.to_dict(),
        metadata=metadata,
        extra={"torch": torch.__version__},
    )


class StoredWeights(NamedTuple):
    """A checkpoint's arrays, spec and metadata, read without building a network."""

    weights: dict[str, np.ndarray]
    spec: ModelSpec
    metadata: dict[str, Any]


def read_weights(*, path: Path | str) -> StoredWeights:
    """Read a checkpoint's weights as numpy arrays after checking them against the manifest.

    No network is built, so the shapes are not checked against the spec here;
    :func:`load_checkpoint` does that.
    """
    stored = read_model(path)
    source = Path(path) if Path(path).is_dir() else Path(path).parent
    spec = ModelSpec.from_dict(stored.spec, source=str(source / MANIFEST_NAME))
    return StoredWeights(weights=stored.weights, spec=spec, metadata=stored.metadata)


def load_checkpoint(*, path: Path | str) -> LoadedCheckpoint:
    """Rebuild the network a checkpoint describes and load its weights (strictly).

    ``path`` is the checkpoint directory or either of its two files. The model comes back on
    the CPU in training mode. Every way the files can be wrong (missing, corrupt, from two
    different saves, or weights that do not fit the spec) raises ModelError naming the file.
    """
    stored = read_weights(path=path)
    weights = (Path(path) if Path(path).is_dir() else Path(path).parent) / WEIGHTS_NAME
    problems = _mismatches(
        {key: tuple(a.shape) for key, a in stored.weights.items()},
        parameter_shapes(spec=stored.spec),
    )
    if problems:
        raise ModelError(
            f"{weights}: weights do not fit the spec of its manifest: " + "; ".join(problems),
            hint="the checkpoint was written for a different network",
        )
    # The fresh weights are overwritten at once; do not let them consume the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = build_model(spec=stored.spec)
    state = {name: torch.from_numpy(array.copy()) for name, array in stored.weights.items()}
    model.load_state_dict(state, strict=True)
    return LoadedCheckpoint(model=model, spec=stored.spec, metadata=stored.metadata)


def model_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The plain network's weights as numpy arrays (what travels to the aggregator)."""
    return {name: tensor.numpy().copy() for name, tensor in plain_state_dict(model).items()}


def load_weights_into(*, model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` into the plain network inside ``model``, strictly.

    Names, shapes and dtypes must all match: a global model for a different network is
    reported with every difference instead of being loaded partly.
    """
    network = unwrap(model)
    current = network.state_dict()
    expected = {key: tuple(t.shape) for key, t in current.items()}
    problems = _mismatches({key: tuple(a.shape) for key, a in weights.items()}, expected)
    if problems:
        raise ModelError(
            "the global model does not fit this site's network: " + "; ".join(problems),
            hint="the run's model settings and the site's data (classes, dimensions) disagree",
        )
    state = {
        name: torch.from_numpy(np.array(array)).to(current[name].dtype)
        for name, array in weights.items()
    }
    network.load_state_dict(state, strict=True)
