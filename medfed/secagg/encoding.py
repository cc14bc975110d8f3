"""Fixed-point encoding modulo 2^32 of weighted updates, with a bound that rules out wrap-around.

A site with weight ``c`` (its patient count, an integer) sends the vector
``[c, c*u_1, ..., c*u_d, c*e_1, ..., c*e_k]``: its update ``u`` and optional extra values ``e``
(a Dice, a loss), each multiplied by ``c``. The sum over sites gives ``sum(c)`` and
``sum(c*u)``, so the weighted mean is known without any site's count being known.

The weight is encoded as the integer it is; every other value ``v`` as ``rint(v * scale)``
modulo 2^32 with ``scale`` a power of two (so dividing by it is exact). **The bound**: with at
most ``n`` sites, weights at most ``W`` and values at most ``B`` in absolute value (the update's
L-infinity clipping bound), the encoded sum cannot wrap around if

    n * rint(W * B * scale) <= 2^31 - 1     and     n * W <= 2^31 - 1,

which is ``n * W * B * scale < 2^31`` up to the rounding of one half unit. Then every coordinate
of the sum lies in [-(2^31 - 1), 2^31 - 1] and reads back exactly as a signed 32-bit integer.
Rounding moves each encoded value by at most ``1 / (2 * scale)``, so each coordinate of the
decoded ``sum(c*u)`` is within ``n / (2 * scale)`` of the exact sum (the weight is exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from medfed.errors import ConfigError, SecureAggregationError

LIMIT: Final = 2**31 - 1
"""The largest absolute value a coordinate of the encoded sum may take."""

_MAX_EXPONENT: Final = 512  # far beyond any useful scale, and far below float64's overflow
_CLIP_HINT = "clip the update (and extras) to the run's bound before encoding: np.clip(u, -B, B)"


def _max_code(max_weight: int, max_abs: float, scale: float) -> int:
    # rint is monotone and c * |v| <= W * B, so no encoded value exceeds this in absolute value.
    return int(np.rint(np.float64(max_weight) * np.float64(max_abs) * np.float64(scale)))


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedPoint:
    """An encoding whose sum cannot wrap: ``sites`` sites, weights and values within bounds.

    Raises:
        ConfigError: (on construction) The parameters break the bound of the module docstring.
    """

    scale: float
    sites: int
    max_weight: int
    max_abs: float

    def __post_init__(self) -> None:
        _check_parameters(sites=self.sites, max_weight=self.max_weight, max_abs=self.max_abs)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(
                f"secure aggregation scale {self.scale!r} must be a positive finite number",
                hint="use choose_scale to pick the scale from the sites, weight and bound",
            )
        total = self.sites * _max_code(self.max_weight, self.max_abs, self.scale)
        if total > LIMIT:
            raise ConfigError(
                f"secure aggregation encoding: {self.sites} sites x rint({self.max_weight} x "
                f"{self.max_abs!r} x {self.scale!r}) = {total} exceeds 2^31 - 1: the sum could "
                "wrap around",
                hint="use a smaller scale (choose_scale picks the largest that fits)",
            )

    @property
    def max_sum_error(self) -> float:
        """The most any coordinate of a decoded ``sum(c*u)`` can be off: ``sites / (2 scale)``."""
        return self.sites / (2 * self.scale)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class WeightedSum:
    """A decoded sum: ``weight`` is ``sum(c)``, ``update`` is ``sum(c*u)``, ``extras`` ``sum(c*e)``.

    Each coordinate of ``update`` and ``extras`` is within ``max_error`` of the exact sum.
    """

    weight: int
    update: np.ndarray
    extras: tuple[float, ...]
    max_error: float

    def mean(self) -> np.ndarray:
        """The weighted mean update ``sum(c*u) / sum(c)`` as float32.

        Raises:
            SecureAggregationError: The weights sum to zero.
        """
        if self.weight <= 0:
            raise SecureAggregationError(
                "the secure sum has total weight 0: no weighted mean exists",
                hint="sites with no training patients must not be the only ones in a round",
            )
        return (self.update / self.weight).astype(np.float32)


def choose_scale(*, sites: int, max_weight: int, max_abs: float, max_error: float) -> FixedPoint:
    """The encoding with the largest power-of-two scale that keeps the bound.

    ``max_error`` is the largest error allowed per coordinate of the decoded ``sum(c*u)``; pick
    it far below the DP noise of the sum (for example a thousandth of its standard deviation).

    Raises:
        ConfigError: The parameters are out of range, the weights alone cannot fit, or the
            largest scale that fits leaves an error above ``max_error``.
    """
    _check_parameters(sites=sites, max_weight=max_weight, max_abs=max_abs)
    if not (math.isfinite(max_error) and max_error > 0):
        raise ConfigError(
            f"secure aggregation max_error {max_error!r} must be a positive finite number",
            hint="give the largest rounding error the sum may carry, far below its DP noise",
        )
    exponent = math.floor(math.log2(LIMIT / (sites * max_weight * max_abs)))
    exponent = min(exponent, _MAX_EXPONENT)
    while (
        exponent < _MAX_EXPONENT
        and sites * _max_code(max_weight, max_abs, 2.0 ** (exponent + 1)) <= LIMIT
    ):
        exponent += 1
    while sites * _max_code(max_weight, max_abs, 2.0**exponent) > LIMIT:
        exponent -= 1
    point = FixedPoint(scale=2.0**exponent, sites=sites, max_weight=max_weight, max_abs=max_abs)
    if point.max_sum_error > max_error:
        raise ConfigError(
            f"secure aggregation of {sites} sites, weights up to {max_weight} and values up to "
            f"{max_abs!r}: the finest scale that cannot wrap ({point.scale!r}) leaves an error of "
            f"{point.max_sum_error:.3g} per coordinate, above max_error {max_error:.3g}",
            hint="clip updates to a smaller bound, cap the weight lower, or allow a larger error",
        )
    return point


def encode_weighted(
    *, point: FixedPoint, weight: int, update: np.ndarray, extras: Sequence[float] = ()
) -> np.ndarray:
    """``[c, c*u, c*e]`` encoded modulo 2^32 (uint32), for ``c`` = ``weight``.

    Raises:
        SecureAggregationError: The weight is not an integer in 0 .. max_weight, or a value of
            the update or the extras is not finite or exceeds the bound ``max_abs``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise SecureAggregationError(
            f"secure aggregation weight {weight!r} is not an integer",
            hint="weight each update by its whole number of patients",
        )
    if not 0 <= weight <= point.max_weight:
        raise SecureAggregationError(
            f"secure aggregation weight {weight} is outside 0..{point.max_weight}",
            hint="cap the weight at the run's max_weight before encoding",
        )
    flat = np.asarray(update).reshape(-1)
    extra = np.asarray(extras, dtype=np.float64).reshape(-1)
    values = np.empty(1 + flat.size + extra.size, dtype=np.float64)
    values[0] = 0.0
    values[1 : 1 + flat.size] = flat
    values[1 + flat.size :] = extra
    body = values[1:]
    if body.size:
        low, high = float(body.min()), float(body.max())  # NaN makes both comparisons fail
        if not (-point.max_abs <= low and high <= point.max_abs):
            raise SecureAggregationError(
                f"secure aggregation: values from {low!r} to {high!r} leave the bound "
                f"+-{point.max_abs!r} (or are not finite)",
                hint=_CLIP_HINT,
            )
    # Multiplied in the order the bound is computed in (c*v, then the scale), so that rounding
    # can never take a value past it.
    body *= float(weight)
    body *= point.scale
    np.rint(body, out=body)
    codes = values.astype(np.int64)
    codes[0] = weight
    return codes.astype(np.uint32)  # keeps the low 32 bits: the value modulo 2^32


def decode_weighted_sum(
    *, point: FixedPoint, total: np.ndarray, sites: int, extras: int = 0
) -> WeightedSum:
    """The weighted sum of ``sites`` sites' encoded inputs, read back from ``total`` (uint32).

    Raises:
        SecureAggregationError: More sites than the encoding allows, a vector of the wrong
            layout, or a coordinate beyond what ``sites`` bounded inputs can add up to (a sum of
            inputs that did not follow the encoding).
    """
    if not 1 <= sites <= point.sites:
        raise SecureAggregationError(
            f"secure aggregation: a sum of {sites} sites, the encoding allows 1..{point.sites}",
            hint="choose the scale for the number of sites in the key epoch",
        )
    if total.dtype != np.uint32 or total.ndim != 1 or total.shape[0] < 1 + extras:
        raise SecureAggregationError(
            f"secure aggregation: a sum of {total.dtype} and shape {total.shape} does not hold a "
            f"weight, an update and {extras} extra value(s)",
            hint="decode with the layout the sites encoded",
        )
    signed = total.view(np.int32).astype(np.int64)
    weight = int(signed[0])
    bound = sites * _max_code(point.max_weight, point.max_abs, point.scale)
    values = signed[1:]
    if not 0 <= weight <= sites * point.max_weight or (
        values.size and int(np.max(np.abs(values))) > bound
    ):
        raise SecureAggregationError(
            f"secure aggregation: the sum of {sites} sites leaves the range its encoding allows",
            hint="every site must encode with the same scale, bound and layout",
        )
    decoded = values.astype(np.float64) / point.scale
    size = decoded.size - extras
    return WeightedSum(
        weight=weight,
        update=decoded[:size],
        extras=tuple(float(v) for v in decoded[size:]),
        max_error=sites / (2 * point.scale),
    )


def _check_parameters(*, sites: int, max_weight: int, max_abs: float) -> None:
    if sites < 2 or max_weight < 1:
        raise ConfigError(
            f"secure aggregation needs at least 2 sites and a max_weight of at least 1, "
            f"not {sites} and {max_weight}",
            hint="secure aggregation sums two or more sites' updates",
        )
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise ConfigError(
            f"secure aggregation bound max_abs {max_abs!r} must be a positive finite number",
            hint="use the L-infinity bound the sites clip their updates to",
        )
    if sites * max_weight > LIMIT:
        raise ConfigError(
            f"secure aggregation: {sites} sites x max_weight {max_weight} exceeds 2^31 - 1",
            hint="cap the weight lower",
        )
