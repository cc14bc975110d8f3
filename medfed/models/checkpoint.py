"""Checkpoints: weights as safetensors plus a small JSON manifest (spec, metadata, weights hash).

A checkpoint is a directory holding ``model.safetensors`` and ``model.json``. Nothing is ever
pickled or read with ``torch.load``: a checkpoint may come from another site. Each file is
written to a temporary name and moved into place with ``os.replace``, weights first; the
manifest records the weights' SHA-256, so a save interrupted between the two files (or files
mixed from two saves) is reported instead of loading the wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from medfed.errors import ModelError
from medfed.models.factory import build_model, parameter_shapes
from medfed.models.spec import ModelSpec

FORMAT = "medfed-checkpoint"
VERSION = 1
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "model.json"
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


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


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


def save_weights(
    *,
    directory: Path | str,
    weights: Mapping[str, np.ndarray],
    spec: ModelSpec,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write plain arrays (e.g. an aggregated global model) as a checkpoint of ``spec``.

    Unlike :func:`save_checkpoint` this builds no network, so the aggregator can save models
    without MONAI; :func:`load_checkpoint` still checks the shapes against the spec.
    """
    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in weights.items()}
    return _write_checkpoint(Path(directory), state, spec, metadata)


def _write_checkpoint(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    metadata: Mapping[str, Any] | None,
) -> Path:
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {}), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"checkpoint metadata is not JSON-serialisable: {exc}",
            hint="pass numbers, strings, lists and mappings only",
        ) from None
    from safetensors.torch import save_file

    try:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_NAME
        _atomic_write(weights, lambda tmp: save_file(dict(state), str(tmp)))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "spec": spec.to_dict(),
            "metadata": metadata_json,
            "weights": {"file": WEIGHTS_NAME, "sha256": _sha256(weights)},
            "torch": torch.__version__,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

        def write_manifest(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        _atomic_write(directory / MANIFEST_NAME, write_manifest)
    except OSError as exc:
        raise ModelError(
            f"cannot write checkpoint to {directory}: {exc.strerror or exc}",
            hint="check that the directory is writable and the disk is not full",
        ) from None
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate(path: Path) -> tuple[Path, Path]:
    directory = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name not in (WEIGHTS_NAME, MANIFEST_NAME):
        raise ModelError(
            f"{path}: not a checkpoint (expected a directory with {WEIGHTS_NAME} and "
            f"{MANIFEST_NAME})"
        )
    return directory / WEIGHTS_NAME, directory / MANIFEST_NAME


def _read_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{manifest}: checkpoint manifest not found", hint="check the checkpoint path"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{manifest}: unreadable checkpoint manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{manifest}: not a medfed checkpoint manifest")
    if data.get("version") != VERSION:
        raise ModelError(
            f"{manifest}: checkpoint format version {data.get('version')!r} "
            f"(this medfed reads version {VERSION})",
            hint="load it with the medfed version that wrote it",
        )
    if not isinstance(data.get("metadata"), dict) or not isinstance(data.get("weights"), dict):
        raise ModelError(f"{manifest}: checkpoint manifest lacks metadata or weights entries")
    return data


class StoredWeights(NamedTuple):
    """A checkpoint's arrays, spec and metadata, read without building a network."""

    weights: dict[str, np.ndarray]
    spec: ModelSpec
    metadata: dict[str, Any]


def read_weights(*, path: Path | str) -> StoredWeights:
    """Read a checkpoint's weights as numpy arrays after checking them against the manifest.

    No network is built (the aggregator has no MONAI), so the shapes are not checked against
    the spec here; :func:`load_checkpoint` does that.
    """
    weights, manifest = _locate(Path(path))
    data = _read_manifest(manifest)
    spec = ModelSpec.from_dict(data.get("spec", {}), source=str(manifest))
    try:
        digest = _sha256(weights)
    except FileNotFoundError:
        raise ModelError(f"{weights}: checkpoint weights not found") from None
    except OSError as exc:
        raise ModelError(f"{weights}: cannot read checkpoint weights ({exc.strerror})") from None
    if digest != data["weights"].get("sha256"):
        raise ModelError(
            f"{weights}: weights do not match the manifest's SHA-256 ({manifest})",
            hint="the checkpoint is corrupt or its files come from different saves; re-save it",
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights}: corrupt safetensors file ({exc})") from None
    return StoredWeights(weights=dict(arrays), spec=spec, metadata=dict(data["metadata"]))


def load_checkpoint(*, path: Path | str) -> LoadedCheckpoint:
    """Rebuild the network a checkpoint describes and load its weights (strictly).

    ``path`` is the checkpoint directory or either of its two files. The model comes back on
    the CPU in training mode. Every way the files can be wrong (missing, corrupt, from two
    different saves, or weights that do not fit the spec) raises ModelError naming the file.
    """
    stored = read_weights(path=path)
    weights, _ = _locate(Path(path))
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
