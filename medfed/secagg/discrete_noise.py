"""A site's share of the distributed discrete Gaussian: rotate, scale, round, add integer noise.

The mechanism of Kairouz, Liu and Steinke, ICML 2021 (accounting in
:mod:`medfed.privacy.distributed_noise`), on the site's side:

1. each patient's clipped gradient is flattened, padded to a power of two and rotated by a
   randomized Walsh-Hadamard transform (random signs from a per-round public seed, then the
   orthonormal Hadamard matrix): the rotation keeps the L2 norm and spreads a large coordinate
   over all of them, so the modular sum of secure aggregation rarely wraps;
2. scaled by ``scale`` onto the integer grid and rounded at random, conditioned on the rounded
   norm staying within the bound the accounting charges (:func:`conditional_round`);
3. the site sums its patients' integer vectors and adds its share of discrete Gaussian noise
   (:func:`discrete_gaussian`); secure aggregation adds the sites' vectors modulo 2^32.

The aggregator divides the integer sum by ``scale`` and rotates it back (:func:`decode_sum`).
Every random draw but the rotation's signs comes from a fresh ChaCha20 keystream, as the site's
continuous DP-SGD noise does (:mod:`medfed.site.noise`); the signs are public by design.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from medfed.csprng import secure_uniforms
from medfed.errors import PrivacyError

Floats = npt.NDArray[np.float64]
Integers = npt.NDArray[np.int64]
#: A randomized rounding that overshoots the bound is redrawn; the accounting's ``beta`` bounds
#: the chance of one redraw, so this many in a row means the bound does not fit the vector.
MAX_ROUNDING_TRIES = 1000
SEED_BYTES = 32


def padded_dim(dim: int) -> int:
    """The power of two the rotation works on: at least ``dim``."""
    if dim < 1:
        raise PrivacyError(f"dim is {dim}", hint="a vector has at least one coordinate")
    return 1 << (dim - 1).bit_length()


def rotate(vector: Floats, *, seed: bytes) -> Floats:
    """The randomized Hadamard rotation of ``vector``, zero-padded to :func:`padded_dim`."""
    flat = np.asarray(vector, dtype=np.float64).ravel()
    padded = np.zeros(padded_dim(flat.size), dtype=np.float64)
    padded[: flat.size] = flat
    padded *= _signs(seed, padded.size)
    return _hadamard(padded)


def unrotate(rotated: Floats, *, seed: bytes, dim: int) -> Floats:
    """The inverse of :func:`rotate`: the first ``dim`` coordinates of the original vector."""
    rotated = np.asarray(rotated, dtype=np.float64)
    if rotated.size != padded_dim(dim):
        raise PrivacyError(
            f"a rotated vector of {rotated.size} coordinates for dim {dim}",
            hint=f"a vector of dim {dim} rotates to {padded_dim(dim)} coordinates",
        )
    restored = _hadamard(rotated) * _signs(seed, rotated.size)
    return restored[:dim]


def conditional_round(scaled: Floats, *, bound: float) -> Integers:
    """Round each coordinate down or up with the probability that keeps its mean, redrawn
    until the L2 norm of the result is at most ``bound`` (Proposition 22)."""
    scaled = np.asarray(scaled, dtype=np.float64)
    floor = np.floor(scaled)
    fraction = scaled - floor
    for _ in range(MAX_ROUNDING_TRIES):
        rounded = floor + (secure_uniforms(scaled.size).reshape(scaled.shape) <= fraction)
        if math.sqrt(float(np.dot(rounded.ravel(), rounded.ravel()))) <= bound:
            return rounded.astype(np.int64)
    raise PrivacyError(
        f"randomized rounding stayed above the L2 bound {bound:g} in {MAX_ROUNDING_TRIES} tries",
        hint="the vector is not clipped to the bound the accounting assumed",
    )


def discrete_gaussian(*, sigma: float, count: int) -> Integers:
    """``count`` draws of the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to
    exp(-x^2 / (2 sigma^2)) on the integers.

    Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
    Algorithm 3, vectorised in floating point: a discrete Laplace proposal of scale
    ``t = floor(sigma) + 1`` (the difference of two geometric draws), accepted with probability
    ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``; accepted values have exactly the target law.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise PrivacyError(f"sigma is {sigma}", hint="sigma must be a positive finite number")
    if count < 0:
        raise PrivacyError(f"count is {count}", hint="count is a number of draws")
    t = math.floor(sigma) + 1
    accepted: list[Integers] = []
    have = 0
    while have < count:
        batch = max(64, int((count - have) * 1.6))
        uniforms = secure_uniforms(3 * batch)
        # Geometric (failures before success, success probability 1 - exp(-1/t)) by inversion.
        first = np.floor(-t * np.log(uniforms[:batch]))
        second = np.floor(-t * np.log(uniforms[batch : 2 * batch]))
        proposal = first - second
        keep = uniforms[2 * batch :] <= np.exp(
            -((np.abs(proposal) - sigma**2 / t) ** 2) / (2.0 * sigma**2)
        )
        kept = proposal[keep].astype(np.int64)
        accepted.append(kept)
        have += kept.size
    return np.concatenate(accepted)[:count] if accepted else np.zeros(0, dtype=np.int64)


def patient_vector(gradient: Floats, *, seed: bytes, scale: float, l2_bound: float) -> Integers:
    """One patient's clipped gradient on the integer grid: rotated, scaled, rounded."""
    return conditional_round(rotate(gradient, seed=seed) * scale, bound=l2_bound)


def decode_sum(summed: Integers, *, seed: bytes, scale: float, dim: int) -> Floats:
    """The aggregator's side: an integer sum of the sites' vectors back to parameter space."""
    return unrotate(np.asarray(summed, dtype=np.float64) / scale, seed=seed, dim=dim)


def _signs(seed: bytes, size: int) -> Floats:
    """``size`` random signs from the public per-round ``seed`` (ChaCha20, zero nonce)."""
    if len(seed) != SEED_BYTES:
        raise PrivacyError(
            f"a rotation seed of {len(seed)} bytes", hint=f"seeds are {SEED_BYTES} bytes"
        )
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    bits = np.unpackbits(np.frombuffer(stream.update(bytes((size + 7) // 8)), dtype=np.uint8))
    return 1.0 - 2.0 * bits[:size].astype(np.float64)


def _hadamard(vector: Floats) -> Floats:
    """The orthonormal Walsh-Hadamard transform (its own inverse), in ``log2(n)`` passes."""
    size = vector.size
    result = vector.copy()
    half = 1
    while half < size:
        blocks = result.reshape(-1, 2, half)
        first, second = blocks[:, 0, :].copy(), blocks[:, 1, :]
        blocks[:, 0, :] += second
        blocks[:, 1, :] = first - second
        half *= 2
    result /= math.sqrt(size)
    return result
