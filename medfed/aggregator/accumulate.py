"""Weighted sums of site updates, folded in place as the updates arrive.

The weighted-mean strategies (FedAvg, FedProx's server step, FedAdam's pseudo-gradient) need
only ``sum_i w_i * x_i`` and ``sum_i w_i``. :class:`WeightedSum` keeps exactly that: one model's
worth of running sums, however many sites answer, so an update can be dropped as soon as it has
been added.

Accumulation is in float32, the dtype the updates travel in. Each fused step
``sum + w_i * x_i`` rounds once, so the sum of ``n`` updates carries at most about ``n`` units
in the last place of the weighted mean of the values' magnitudes (``n * 2**-24`` relative;
random rounding errors make it about ``sqrt(n)`` in practice), on top of the half unit that
rounding the result to float32 costs anyway. For the tens of sites of a federation that is the
size of the inputs' own float32 quantisation, and orders of magnitude below the noise DP-SGD
adds to every update. A float64 sum would be exact here but reads and writes twice the bytes
per update and goes through numpy's slower mixed-dtype loops: measured, it aggregated at less
than half the float32 speed (benchmarks/README.md, "Streaming aggregation").

The fold is memory-bound: per update it must read the update and read and write the sums, and
anything more shows directly in the time. numpy has no fused multiply-add, so with numpy alone
a weighted fold is two passes (the product, then the addition), which measured at about 0.4 of
a plain copy's bandwidth. BLAS ``saxpy`` (``y += a * x``, through :mod:`scipy.linalg.blas`) is
that fold in one pass, and an element-wise one: each element's result depends only on its own
inputs, so the result is the same bit for bit for the same updates in the same order, whatever
the thread count. It runs on one thread (:func:`_blas`): the fold is bound by memory, not
arithmetic, and on a two-core host whose other core was busy (as an aggregator's is, with the
SuperLink and MLflow beside it) two BLAS threads made it four times slower than one, 0.16
against 0.65 of a copy's bandwidth. Updates that are not contiguous float32 are converted once,
before the fold.

BLAS reports no floating-point errors to numpy, and a pass over the sums after every update to
look for infinities, even while they are in cache, measured at 6-9% of the fold's time. The
updates reaching the fold are finite and within the round's norm bound
(:mod:`medfed.aggregator.validation`), so an overflow of the float32 sums would take values
near 1e38; :meth:`WeightedSum.result` checks every array of the mean while it is in cache from
the division, so that a non-finite model never comes out, whatever the updates held.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medfed.errors import AggregationError
from medfed.types import SiteUpdate

__all__ = ["SUM_DTYPE", "WeightedSum", "layout_problems"]

SUM_DTYPE = np.dtype(np.float32)

Layout = Mapping[str, tuple[int, ...]]


@functools.cache
def _blas() -> tuple[Callable[..., np.ndarray], Callable[..., float], Any]:
    """``saxpy``, ``sasum`` and a thread-pool controller of the BLAS libraries loaded.

    Imported on first use: scipy.linalg takes a tenth of a second to import, which commands
    that never aggregate should not pay. The controller is made once, after scipy's BLAS is
    loaded, so that it sees it; limiting through it costs microseconds, finding the libraries
    again would cost milliseconds per update.
    """
    from scipy.linalg.blas import sasum, saxpy
    from threadpoolctl import ThreadpoolController

    return saxpy, sasum, ThreadpoolController()


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
        """Bytes of array memory this accumulator holds: the sums."""
        return int(self._buffer.nbytes)

    def add(self, *, update: SiteUpdate, weight: float) -> None:
        """Fold ``weight * update.weights`` into the sums.

        Raises:
            AggregationError: ``weight`` is not a positive finite number.
            AggregationError: The update's names or shapes differ from the layout.
            AggregationError: Converting the update to float32 overflows; the accumulator is
                spoiled.
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
        # exactly and equally weighted ones are added exactly as a plain sum (a product by 1
        # does not round): the mean of one update is that update, bit for bit. Each factor is
        # rounded to float32 once, and the divisor is the sum of the same rounded factors.
        first = not self._sites
        unit = float(weight) if first else self._unit
        factor = SUM_DTYPE.type(weight / unit)
        if not factor > 0:
            raise AggregationError(
                f"{site}: weight {weight} is too small beside the first update's {unit}",
                hint="weight each update by its released patient count, at least 1",
            )
        saxpy, _, threads = _blas()
        try:
            with (
                np.errstate(over="raise", invalid="raise"),
                threads.limit(limits=1, user_api="blas"),
            ):
                if first:
                    for name, sums in self._sums.items():
                        np.copyto(sums, _flat_sum_dtype(update.weights[name]))
                else:
                    self._fold(update.weights, factor, saxpy)
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

    def _fold(
        self,
        weights: Mapping[str, np.ndarray],
        factor: np.float32,
        saxpy: Callable[..., np.ndarray],
    ) -> None:
        """``sums += factor * weights``, array by array."""
        for name, sums in self._sums.items():
            values = weights[name]
            if values.dtype == SUM_DTYPE and values.flags.c_contiguous:
                values = values.reshape(-1)
            else:
                values = _flat_sum_dtype(values)
            saxpy(values, sums, a=factor)  # in place: sums is contiguous float32

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean of the updates added: float32, shaped like the layout, read-only.

        The mean is computed in place: the sums become the result, so the round holds one
        model's worth in all, and the accumulator takes no further updates.

        Raises:
            AggregationError: No update was added, or an earlier ``add`` spoiled the sums.
            AggregationError: The mean is not finite: an update held infinities or NaNs, or
                the sums overflowed (the accumulator is spoiled).
        """
        self._check_usable()
        if not self._sites:
            raise AggregationError(
                "no site updates to aggregate",
                hint="every site failed or was rejected this round; see the rejection reasons",
            )
        _, sasum, _ = _blas()
        divisor = SUM_DTYPE.type(self._factors)
        for name, sums in self._sums.items():
            if divisor != 1:
                np.divide(sums, divisor, out=sums)
            bad = _non_finite(sums, sasum)
            if bad:
                self._closed = (
                    f"{bad} values of array {name!r} of the mean of {len(self._sites)} sites' "
                    "updates are infinite or NaN",
                    "reject updates with non-finite or huge values (validate with "
                    "partition_updates and max_norm_ratio) and aggregate the round again",
                )
                raise AggregationError(self._closed[0], hint=self._closed[1])
        self._closed = ("its result has been taken", "start a new one for the next round")
        result = {name: self._sums[name].reshape(shape) for name, shape in self._layout.items()}
        for array in result.values():
            array.flags.writeable = False
        return result

    def _check_usable(self) -> None:
        if self._closed is not None:
            message, hint = self._closed
            raise AggregationError(f"the weighted sum takes no more calls: {message}", hint=hint)


def _flat_sum_dtype(values: np.ndarray) -> np.ndarray:
    """``values`` as one contiguous float32 row: a view if it is one already, else one copy."""
    return np.ravel(np.asarray(values, dtype=SUM_DTYPE, order="C"))


def _non_finite(values: np.ndarray, sasum: Callable[..., float]) -> int:
    """How many elements of the float32 ``values`` are infinite or NaN.

    ``sasum`` (the sum of magnitudes) reads the array once at cache speed and is finite
    whenever every element is, unless finite magnitudes add up past float32's range: only
    then is the exact, slower count needed.
    """
    if values.size == 0 or math.isfinite(sasum(values)):
        return 0
    return int(values.size - np.count_nonzero(np.isfinite(values)))
