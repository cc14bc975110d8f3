"""Frozen value types shared by the site and the aggregator.

These are the only objects that cross the site/aggregator boundary inside Python. The transport
layer converts Flower records to and from them in one place; nothing here knows about Flower,
torch or MONAI, so the aggregator can import it without pulling in training code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeGuard

import numpy as np
import numpy.typing as npt

__all__ = ["SiteUpdate", "freeze_arrays", "weights_digest"]


class _FrozenArrays(Mapping[str, np.ndarray]):
    """What :func:`freeze_arrays` returns: read-only arrays of which nothing outside holds a
    writable reference, under names that cannot change.

    Being of this type is the proof :func:`freeze_arrays` checks to hand such a mapping back
    as it is, so that freezing what is frozen (a reply's weights becoming a
    :class:`SiteUpdate`) copies nothing.
    """

    __slots__ = ("_arrays",)

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = MappingProxyType(arrays)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"frozen_arrays({dict(self._arrays)!r})"


def _may_keep(array: object) -> TypeGuard[np.ndarray]:
    """Whether ``array`` can be held without a copy: a read-only, aligned, C-contiguous ndarray
    whose memory nobody can write through another object (every ndarray it views is read-only
    too, and the memory at the bottom is an ndarray's own or immutable bytes)."""
    if not isinstance(array, np.ndarray):
        return False
    if not (array.flags.c_contiguous and array.flags.aligned):
        return False
    owner: object = array
    while isinstance(owner, np.ndarray):
        if owner.flags.writeable:
            return False
        owner = owner.base
    return owner is None or isinstance(owner, bytes)


def freeze_arrays(
    arrays: Mapping[str, npt.ArrayLike], *, copy: bool = True
) -> Mapping[str, np.ndarray]:
    """Return a read-only mapping of read-only arrays holding the values of ``arrays``.

    By default every array is copied: marking the caller's own arrays read-only would change
    objects we do not own, and a view of a writable array could still be changed through its
    base. A mapping this function returned is handed back as it is, since it already keeps
    that promise. Dtypes are kept as given so that validation can report a wrong dtype instead
    of hiding it by casting.

    Args:
        arrays: Names to arrays (or anything ``np.array`` reads).
        copy: ``False`` hands the arrays over: the caller made them, keeps no reference to them,
            and marked them (and the ndarrays they view) read-only, as the envelope does with
            the arrays it has just read from a message. Each such read-only, C-contiguous array
            is kept without a copy; anything else is still copied.
    """
    if type(arrays) is _FrozenArrays:
        return arrays
    frozen: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not copy and _may_keep(value):
            array = value
        else:
            array = np.array(value, copy=True)
            array.setflags(write=False)
        frozen[name] = array
    return _FrozenArrays(frozen)


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies one model's weights exactly.

    Sites name the model a release was computed with by it, and the aggregator finds the
    releases of the model it sent by it.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.require(weights[name], requirements="C")
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# eq=False: comparing arrays element-wise has no single truth value, so equality is identity.
@dataclass(frozen=True, eq=False)
class SiteUpdate:
    """One site's reply to one training round.

    Attributes:
        site_id: The site's stable identifier (the name registered with the aggregator).
        round: The federation round this update answers (1-based, as the server numbers rounds).
        weights: Full model weights after local training, by parameter name (float32 when built
            by the transport layer). Stored read-only: copied, unless given a mapping
            :func:`freeze_arrays` returned (a reply's weights as the envelope read them),
            which is held as it is, so an update costs no copy beyond reading the message.
        num_patients: The site's released (noisy, or public) training patient count, read from
            its signed ledger; FedAvg weights by it. What else the site released about the
            round is in its ledger too (:mod:`medfed.aggregator.releases`).

    Construction does not judge the content: :func:`medfed.aggregator.validation.validate_update`
    reports every problem (shapes, dtypes, NaNs, stale rounds) so a bad update can be rejected
    with a reason rather than crash the round.
    """

    site_id: str
    round: int
    weights: Mapping[str, np.ndarray]
    num_patients: int

    def __post_init__(self) -> None:
        # Frozen dataclass: object.__setattr__ is the documented way to normalise fields.
        object.__setattr__(self, "weights", freeze_arrays(self.weights))
