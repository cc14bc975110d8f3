"""Models and arrays on disk without torch: safetensors files, and a model's JSON manifest.

A model is a directory holding ``model.safetensors`` and ``model.json`` (the network's spec as
a mapping, metadata, and the weights' SHA-256). Nothing is ever pickled: a model may come from
another site. Every file is written to a temporary name, fsynced and moved into place; the
weights go first and the manifest records their digest, so a save interrupted between the two
files (or files mixed from two saves) is reported instead of loading the wrong weights.

The one writer of every safetensors file medfed keeps: site checkpoints
(:mod:`medfed.models.checkpoint` adds the torch side), the aggregator's global models and its
strategy state (:mod:`medfed.aggregator.run_store`), and a site's stored replies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np

from medfed.errors import ModelError
from medfed.storage import replace_file

FORMAT: Final = "medfed-checkpoint"
VERSION: Final = 1
WEIGHTS_NAME: Final = "model.safetensors"
MANIFEST_NAME: Final = "model.json"


class StoredModel(NamedTuple):
    """A model's arrays, its spec (as written) and its metadata, read without a network."""

    weights: dict[str, np.ndarray]
    spec: dict[str, Any]
    metadata: dict[str, Any]


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The safetensors bytes of ``arrays`` (row-major copies where needed, 0-d arrays kept 0-d)."""
    from safetensors.numpy import save

    return save({name: np.require(array, requirements="C") for name, array in arrays.items()})


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray], *, mode: int = 0o644) -> None:
    """Write ``arrays`` to one safetensors file, atomically and fsynced."""
    replace_file(Path(path), encode_arrays(arrays), mode=mode)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file; :class:`ModelError` for a missing or corrupt one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return dict(load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: corrupt safetensors file ({exc})") from None


def write_model(
    directory: Path,
    *,
    weights: Mapping[str, np.ndarray],
    spec: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model: its weights, then a manifest with ``spec``, ``metadata`` and their digest.

    ``extra`` entries go into the manifest as they are (the torch version of a site checkpoint,
    say). Returns the directory.
    """
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {}), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"checkpoint metadata is not JSON-serialisable: {exc}",
            hint="pass numbers, strings, lists and mappings only",
        ) from None
    directory = Path(directory)
    data = encode_arrays(weights)
    manifest = {
        **dict(extra or {}),
        "format": FORMAT,
        "version": VERSION,
        "spec": dict(spec),
        "metadata": metadata_json,
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(data).hexdigest()},
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        replace_file(directory / WEIGHTS_NAME, data)
        replace_file(directory / MANIFEST_NAME, text.encode("utf-8"))
    except OSError as exc:
        raise ModelError(
            f"cannot write checkpoint to {directory}: {exc.strerror or exc}",
            hint="check that the directory is writable and the disk is not full",
        ) from None
    return directory


def read_model(path: Path | str) -> StoredModel:
    """Read a model's weights after checking them against its manifest's digest.

    ``path`` is the model's directory or either of its two files. No network is built, so the
    shapes are not checked against the spec here (:func:`medfed.models.load_checkpoint` does).
    """
    weights, manifest = _locate(Path(path))
    data = _read_manifest(manifest)
    try:
        raw = weights.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{weights}: checkpoint weights not found") from None
    except OSError as exc:
        raise ModelError(f"{weights}: cannot read checkpoint weights ({exc.strerror})") from None
    if hashlib.sha256(raw).hexdigest() != data["weights"].get("sha256"):
        raise ModelError(
            f"{weights}: weights do not match the manifest's SHA-256 ({manifest})",
            hint="the checkpoint is corrupt or its files come from different saves; re-save it",
        )
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ModelError(f"{manifest}: the manifest has no network spec")
    return StoredModel(weights=read_arrays(weights), spec=spec, metadata=dict(data["metadata"]))


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
