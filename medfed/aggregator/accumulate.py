"""Weighted sums of site updates, folded in place as the updates arrive.

The weighted-mean strategies (FedAvg, FedProx's server step, FedAdam's pseudo-gradient) need
only ``sum_i w_i * x_i`` and ``sum_i w_i``. :class:`WeightedSum` keeps exactly that: one model's
worth of running sums and a scratch block, however many sites answer, so an update can be
dropped as soon as it has been added.

Accumulation is in float32, the dtype the updates travel in. Each product ``w_i * x_i`` and
each addition rounds once, so the sum of ``n`` updates carries at most about ``n`` units in the
last place of the weighted mean of the values' magnitudes (``n * 2**-24`` relative; random
rounding errors make it about ``sqrt(n)`` in practice), on top of the half unit that rounding
the result to float32 costs anyway. For the tens of sites of a federation that is the size of
the inputs' own float32 quantisation, and orders of magnitude below the noise DP-SGD adds to
every update. A float64 sum would be exact here but reads and writes twice the bytes per
update and goes through numpy's slower mixed-dtype loops: measured, it aggregated at less than
half the float32 speed (benchmarks/README.md, "Streaming aggregation").

numpy has no fused multiply-add, so a weighted fold is two passes: the product into a scratch
block of :data:`BLOCK` elements, small enough to stay in a core's L2 cache, then the addition.
Memory traffic per update is still the update read once and the sums read and written once,
and no temporary the size of a tensor is allocated. Equally weighted updates skip the product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from medfed.errors import AggregationError
from medfed.types import SiteUpdate

__all__ = ["BLOCK", "SUM_DTYPE", "WeightedSum", "layout_problems"]

SUM_DTYPE = np.dtype(np.float32)
#: Elements per scratch block: 256 KiB of float32, well inside a core's L2 cache.
BLOCK = 1 << 16

Layout = Mapping[str, tuple[int, ...]]


def layout_problems(*, weights: Mapping[str, np.ndarray], layout: Layout) -> list[str]:
    """Names of the arrays whose presence or shape differs from ``layout`` (sorted)."""
    shapes = {name: tuple(array.shape) for name, array in weights.items()}
    if shapes == layout:
        return []
    return sorted(
        name for name in layout.keys() | shapes.keys() if layout.get(name) != shapes.get(name)
    )


class WeightedSum:
    """Running ``sum_i w_i * x_i`` and ``sum_i w_i`` over updates shaped like ``layout``.

    ``add`` folds an update in and keeps no reference to it; ``result`` gives the weighted mean
    as float32 arrays. The order of the updates changes the result only by float32 rounding.
    After ``result``, or an error in ``add`` (an overflow half way through an update), every
    later call raises.
    """

    def __init__(self, *, layout: Layout) -> None:
        self._layout = {name: tuple(int(d) for d in shape) for name, shape in layout.items()}
        sizes = {name: math.prod(shape) for name, shape in self._layout.items()}
        # One buffer for all sums: allocated once, untouched until the first update is written
        # into it (no zero-filling pass).
        self._buffer = np.empty(sum(sizes.values()), dtype=SUM_DTYPE)
        self._sums: dict[str, np.ndarray] = {}
        offset = 0
        for name, size in sizes.items():
            self._sums[name] = self._buffer[offset : offset + size]
            offset += size
        self._scratch = np.empty(min(BLOCK, max(sizes.values(), default=0)), dtype=SUM_DTYPE)
        self._sites: list[str] = []
        self._unit = 1.0
        self._factors = 0.0
        self._total = 0.0
        # Why the accumulator takes no more calls, and what to do: set by result() or an overflow.
        self._closed: tuple[str, str] | None = None

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites added so far, in the order they were added."""
        return tuple(self._sites)

    @property
    def total_weight(self) -> float:
        """The sum of the weights added so far."""
        return self._total

    @property
    def nbytes(self) -> int:
        """Bytes of array memory this accumulator holds: the sums and the scratch block."""
        return int(self._buffer.nbytes + self._scratch.nbytes)

    def add(self, *, update: SiteUpdate, weight: float) -> None:
        """Fold ``weight * update.weights`` into the sums.

        Raises:
            AggregationError: ``weight`` is not a positive finite number.
            AggregationError: The update's names or shapes differ from the layout.
            AggregationError: The sums overflow float32 (the accumulator is spoiled).
        """
        self._check_usable()
        site = f"site {update.site_id!r}"
        differing = layout_problems(weights=update.weights, layout=self._layout)
        if differing:
            raise AggregationError(
                f"{site}: arrays {differing[:5]} differ in name or shape from the model being "
                "aggregated",
                hint="validate updates with partition_updates before aggregating",
            )
        if not (math.isfinite(weight) and weight > 0):
            raise AggregationError(
                f"{site}: weight {weight} is not a positive number",
                hint="weight each update by its released patient count, at least 1",
            )
        # Weights are taken relative to the first update's, so the first update is copied
        # exactly and equally weighted ones are added without a product: the mean of one
        # update is that update, bit for bit. Each factor is rounded to float32 once, and the
        # divisor is the sum of the same rounded factors.
        first = not self._sites
        unit = float(weight) if first else self._unit
        factor = SUM_DTYPE.type(weight / unit)
        if not factor > 0:
            raise AggregationError(
                f"{site}: weight {weight} is too small beside the first update's {unit}",
                hint="weight each update by its released patient count, at least 1",
            )
        try:
            with np.errstate(over="raise", invalid="raise"):
                for name, sums in self._sums.items():
                    values = np.ravel(update.weights[name])
                    if first:
                        np.copyto(sums, values)
                    else:
                        self._fold(sums, values, factor)
        except FloatingPointError as exc:
            self._closed = (
                f"{site}'s update overflowed the float32 sums ({exc})",
                "reject updates with huge values (validate with max_norm_ratio) and aggregate "
                "the round again",
            )
            raise AggregationError(self._closed[0], hint=self._closed[1]) from exc
        self._unit = unit
        self._sites.append(update.site_id)
        self._factors += float(factor)
        self._total += float(weight)

    def _fold(self, sums: np.ndarray, values: np.ndarray, factor: np.float32) -> None:
        if factor == 1:
            np.add(sums, values, out=sums)
            return
        for start in range(0, values.size, BLOCK):
            part = values[start : start + BLOCK]
            product = self._scratch[: part.size]
            target = sums[start : start + BLOCK]
            np.multiply(part, factor, out=product)
            np.add(target, product, out=target)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean of the updates added: float32, shaped like the layout, read-only.

        The mean is computed in place: the sums become the result, so the round holds one
        model's worth in all, and the accumulator takes no further updates.

        Raises:
            AggregationError: No update was added, or an earlier ``add`` spoiled the sums.
        """
        self._check_usable()
        if not self._sites:
            raise AggregationError(
                "no site updates to aggregate",
                hint="every site failed or was rejected this round; see the rejection reasons",
            )
        if self._factors != 1:
            np.divide(self._buffer, SUM_DTYPE.type(self._factors), out=self._buffer)
        self._closed = ("its result has been taken", "start a new one for the next round")
        result = {name: self._sums[name].reshape(shape) for name, shape in self._layout.items()}
        for array in result.values():
            array.flags.writeable = False
        return result

    def _check_usable(self) -> None:
        if self._closed is not None:
            message, hint = self._closed
            raise AggregationError(f"the weighted sum takes no more calls: {message}", hint=hint)
