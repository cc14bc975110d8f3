"""Frozen value types shared by the site and the aggregator.

These are the only objects that cross the site/aggregator boundary inside Python. The transport
layer converts Flower records to and from them in one place; nothing here knows about Flower,
torch or MONAI, so the aggregator can import it without pulling in training code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

__all__ = ["SiteUpdate", "freeze_arrays", "weights_digest"]


def freeze_arrays(arrays: Mapping[str, npt.ArrayLike]) -> Mapping[str, np.ndarray]:
    """Return a read-only mapping of read-only copies of ``arrays``.

    The copy is deliberate: marking the caller's own arrays read-only would change objects we do
    not own, and a view of a writable array could still be changed through its base. Dtypes are
    kept as given so that validation can report a wrong dtype instead of hiding it by casting.
    """
    frozen: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.array(value, copy=True)
        array.setflags(write=False)
        frozen[name] = array
    return MappingProxyType(frozen)


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
            by the transport layer). Stored as read-only copies.
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
