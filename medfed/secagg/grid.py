"""The integer grid of a distributed-noise round, which the sites and the aggregator both derive.

With distributed noise (Kairouz, Liu and Steinke, ICML 2021; accounting in
:mod:`medfed.privacy.distributed_noise`, the site's rounding and noise in
:mod:`medfed.secagg.discrete_noise`) a site's masked input is not a fixed-point weight change but an
integer vector: the sum over its patients of each patient's clipped gradient, rotated, scaled and
rounded to the grid, then one *count coordinate* to which each patient adds ``count_weight``,
plus the site's discrete Gaussian share on every coordinate. Secure aggregation adds these vectors
modulo 2^32, so the aggregator learns the noisy sums over the sites only: the gradient sum and the
patient count, each with the sum of the shares' noise, never one site's.

Everything here follows from public values: the number of the global model's coordinates, the
run's clipping bound and count weight, the run name and the round. The rotation's signs are
public randomness (a per-round seed from the run name and round); the mechanism's privacy does not
rest on them, they only spread the vector so that its integer sum stays far from wrapping.

**Grid.** A patient's clipped gradient (L2 norm at most ``clip``) is scaled so that its norm is
at most ``GRID_NORM * sqrt(padded)`` grid units: per coordinate about ``GRID_NORM`` units after the
rotation, and rounding adds at most ``padded / 4`` to the squared norm, 0.4% of it.

**No wrap-around.** After the rotation one patient's coordinate exceeds
``GRID_NORM * sqrt(2 ln(2 padded / 1e-9))`` with probability below 1e-9 (a sub-Gaussian tail),
and the summed noise exceeds ``8`` of its standard deviations in any coordinate with probability
below ``padded * 1e-15``. :func:`wrap_problem` checks that ``patients`` of such coordinates plus
that noise stay below 2^31 in the gradient part, and that ``patients * count_weight`` plus the
noise do in the count coordinate; the aggregator refuses settings that do not.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from medfed.errors import SecureAggregationError
from medfed.privacy.distributed_noise import rounded_l2_bound
from medfed.secagg.discrete_noise import SEED_BYTES, decode_sum, padded_dim

GRID_NORM: Final = 8.0
"""One patient's clipped gradient spans this many grid units per coordinate after rotation."""
ROUNDING_BETA: Final = math.exp(-0.5)
"""Conditional rounding's parameter (Kairouz et al. use the same): a redraw at most this often."""
HALF_RANGE: Final = 2**31
TAIL_SIGMAS: Final = 8.0


@dataclass(frozen=True, kw_only=True)
class Grid:
    """The integer grid of one distributed-noise round.

    ``dim`` is the global model's number of values (every array, sorted by name, flattened),
    ``padded`` the rotation's power of two, ``scale`` the factor from parameter units to grid
    units, ``l2_bound`` one patient's rounded vector's L2 bound (what the accounting charges),
    ``count_weight`` what each patient adds to the count coordinate.
    """

    dim: int
    padded: int
    clip: float
    scale: float
    beta: float
    l2_bound: float
    count_weight: int
    rotation_seed: bytes

    @property
    def length(self) -> int:
        """The masked vector's length: the rotated gradient and the count coordinate."""
        return self.padded + 1


def rotation_seed(*, run_id: str, round_id: int) -> bytes:
    """The public per-round seed of the rotation's signs."""
    material = f"medfed distributed noise rotation\x00{run_id}\x00{round_id}".encode()
    return hashlib.sha256(material).digest()[:SEED_BYTES]


def grid_for(*, dim: int, clip: float, count_share: float, run_id: str, round_id: int) -> Grid:
    """The grid of a round of ``run_id`` for a model of ``dim`` values and clip ``clip``.

    ``count_share`` sets the count coordinate's weight as a share of one patient's gradient
    bound: the patient's L2 sensitivity grows by ``sqrt(1 + count_share^2)`` and the summed
    count carries noise ``1 / count_share`` times the gradient's, in patients.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise SecureAggregationError(f"the clipping bound is {clip}", hint="use a positive clip")
    if not 0 < count_share <= 1:
        raise SecureAggregationError(
            f"the count share is {count_share}", hint="use a count share in (0, 1]"
        )
    padded = padded_dim(dim)
    scale = GRID_NORM * math.sqrt(padded) / clip
    l2_bound = rounded_l2_bound(l2_bound=clip * scale, beta=ROUNDING_BETA, dim=padded)
    return Grid(
        dim=dim,
        padded=padded,
        clip=float(clip),
        scale=scale,
        beta=ROUNDING_BETA,
        l2_bound=l2_bound,
        count_weight=max(1, round(count_share * l2_bound)),
        rotation_seed=rotation_seed(run_id=run_id, round_id=round_id),
    )


def wrap_problem(*, grid: Grid, patients: int, noise_std: float) -> str | None:
    """Why ``patients`` patients' vectors plus noise of ``noise_std`` (grid units, summed
    over the sites) could wrap modulo 2^32; None when they cannot, but with the tail
    probabilities of the module's docstring."""
    per_patient = GRID_NORM * math.sqrt(2.0 * math.log(2.0 * grid.padded / 1e-9)) + 1.0
    noise = TAIL_SIGMAS * noise_std
    gradient = patients * per_patient + noise
    count = patients * grid.count_weight + noise
    if max(gradient, count) < HALF_RANGE:
        return None
    return (
        f"{patients} patients and noise of standard deviation {noise_std:.4g} could reach "
        f"{max(gradient, count):.3g} in one coordinate, beyond 2^31"
    )


def to_words(vector: np.ndarray) -> np.ndarray:
    """A signed integer vector as the uint32 words secure aggregation adds modulo 2^32."""
    return np.asarray(vector, dtype=np.int64).astype(np.uint32)


def from_words(words: np.ndarray) -> np.ndarray:
    """A uint32 sum back to signed integers (the sum is known to lie in [-2^31, 2^31))."""
    signed = np.asarray(words, dtype=np.uint32).astype(np.int64)
    signed[signed >= HALF_RANGE] -= 2**32
    return signed


@dataclass(frozen=True, eq=False)
class NoisySum:
    """What the aggregator learns from a round: the sites' noisy gradient sum, noisy count."""

    gradient: np.ndarray  # float64, the model's ``dim`` values in parameter units
    patients: float


def decode(*, grid: Grid, words: np.ndarray) -> NoisySum:
    """The unmasked sum of a round's inputs back to parameter units.

    Raises:
        SecureAggregationError: The sum has another length than the grid's.
    """
    if words.shape != (grid.length,):
        raise SecureAggregationError(
            f"a sum of {words.size} words for a grid of {grid.length}",
            hint="every site encodes the global model's values and one count",
        )
    signed = from_words(words)
    gradient = decode_sum(
        signed[: grid.padded], seed=grid.rotation_seed, scale=grid.scale, dim=grid.dim
    )
    return NoisySum(gradient=gradient, patients=float(signed[grid.padded]) / grid.count_weight)
