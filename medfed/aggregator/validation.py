"""Checking site updates before they reach a strategy.

Two levels, both pure (no I/O, no logging):

* :func:`validate_update` / :func:`partition_updates` judge each update against the global model
  and return *every* problem as text, so the server can drop a bad site with a logged reason and
  go on with the others.
* :func:`check_aggregatable` is the strategies' own guard. It raises, because reaching a strategy
  with an empty or inconsistent update list means the step above was skipped or all sites failed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.errors import AggregationError, ConfigError
from medfed.types import SiteUpdate

__all__ = ["Rejection", "check_aggregatable", "partition_updates", "validate_update"]


@dataclass(frozen=True)
class Rejection:
    """An update the server refused, with every reason found."""

    site_id: str
    reasons: tuple[str, ...]


def _norm(arrays: Mapping[str, np.ndarray], minus: Mapping[str, np.ndarray] | None) -> float:
    total = 0.0
    for name, array in arrays.items():
        values = array.astype(np.float64)
        if minus is not None:
            values = values - minus[name].astype(np.float64)
        total += float(np.dot(values.ravel(), values.ravel()))
    return math.sqrt(total)


def validate_update(
    *,
    update: SiteUpdate,
    reference: Mapping[str, np.ndarray],
    expected_round: int,
    max_norm_ratio: float | None = None,
) -> list[str]:
    """List every problem with ``update``; an empty list means it may be aggregated.

    Args:
        update: The site's reply.
        reference: The global model's arrays this round started from (names, shapes, dtypes).
        expected_round: The round the server is aggregating; any other round id is stale or
            forged.
        max_norm_ratio: If given, reject an update whose distance from ``reference`` exceeds this
            multiple of the reference's norm (a cheap guard against diverged or hostile sites).
            Skipped when the reference is all zeros, since there is no scale to compare with.

    Every reason names the site, and the array where one is involved.
    """
    if max_norm_ratio is not None and not max_norm_ratio > 0:
        raise ConfigError(
            f"max_norm_ratio must be positive, got {max_norm_ratio}",
            hint="leave it unset to skip the distance check",
        )
    site = f"site {update.site_id!r}"
    problems: list[str] = []
    if not update.site_id.strip():
        problems.append(f"{site}: site_id is empty")
    if update.round != expected_round:
        problems.append(
            f"{site}: update is for round {update.round}, expected round {expected_round}"
        )
    if update.num_patients < 1:
        problems.append(f"{site}: num_patients is {update.num_patients}, must be at least 1")

    structure_ok = True
    for name in sorted(reference.keys() - update.weights.keys()):
        problems.append(f"{site}: array {name!r} is missing")
        structure_ok = False
    for name in sorted(update.weights.keys() - reference.keys()):
        problems.append(f"{site}: array {name!r} is not in the global model")
        structure_ok = False
    for name in sorted(reference.keys() & update.weights.keys()):
        array, expected = update.weights[name], reference[name]
        if array.shape != expected.shape:
            problems.append(
                f"{site}: array {name!r} has shape {array.shape}, expected {expected.shape}"
            )
            structure_ok = False
        if array.dtype != expected.dtype:
            problems.append(
                f"{site}: array {name!r} has dtype {array.dtype}, expected {expected.dtype}"
            )
            structure_ok = False
        # Integer arrays are always finite; object or string arrays were reported above.
        if array.dtype.kind in "fc":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                problems.append(f"{site}: array {name!r} has {bad} non-finite values (NaN/Inf)")
                structure_ok = False

    # A distance is only meaningful between arrays of matching shape and finite values.
    if max_norm_ratio is not None and structure_ok:
        scale = _norm(reference, None)
        if scale > 0:
            ratio = _norm(update.weights, reference) / scale
            if ratio > max_norm_ratio:
                problems.append(
                    f"{site}: update is {ratio:.3g} times the global model's norm away from it "
                    f"(limit {max_norm_ratio:g})"
                )
    return problems


def partition_updates(
    *,
    updates: Sequence[SiteUpdate],
    reference: Mapping[str, np.ndarray],
    expected_round: int,
    max_norm_ratio: float | None = None,
) -> tuple[list[SiteUpdate], list[Rejection]]:
    """Split ``updates`` into those fit to aggregate and those rejected, with reasons.

    A site that sent more than one update for the round is rejected entirely: which copy is
    genuine cannot be told here, and counting both would give that site double weight.
    """
    counts = Counter(update.site_id for update in updates)
    valid: list[SiteUpdate] = []
    rejected: list[Rejection] = []
    for update in updates:
        reasons = validate_update(
            update=update,
            reference=reference,
            expected_round=expected_round,
            max_norm_ratio=max_norm_ratio,
        )
        if counts[update.site_id] > 1:
            reasons.append(
                f"site {update.site_id!r}: sent {counts[update.site_id]} updates for round "
                f"{expected_round}"
            )
        if reasons:
            rejected.append(Rejection(site_id=update.site_id, reasons=tuple(reasons)))
        else:
            valid.append(update)
    return valid, rejected


def check_aggregatable(
    *, updates: Sequence[SiteUpdate], reference: Mapping[str, np.ndarray] | None = None
) -> Mapping[str, tuple[int, ...]]:
    """Raise unless ``updates`` is non-empty and every update has the same names and shapes.

    The layout is compared with ``reference`` when given, else with the first update. Returns
    that layout (name -> shape) so strategies can iterate over it.

    Raises:
        AggregationError: No updates (every site failed or was rejected).
        AggregationError: Names or shapes differ between updates or from ``reference``.
    """
    if not updates:
        raise AggregationError(
            "no site updates to aggregate",
            hint="every site failed or was rejected this round; see the rejection reasons",
        )
    if reference is not None:
        layout = {name: tuple(array.shape) for name, array in reference.items()}
        source = "the global model"
    else:
        layout = {name: tuple(array.shape) for name, array in updates[0].weights.items()}
        source = f"site {updates[0].site_id!r}"
    for update in updates:
        shapes = {name: tuple(array.shape) for name, array in update.weights.items()}
        if shapes != layout:
            differing = sorted(
                name
                for name in layout.keys() | shapes.keys()
                if layout.get(name) != shapes.get(name)
            )
            raise AggregationError(
                f"site {update.site_id!r}: arrays {differing[:5]} differ in name or shape "
                f"from {source}",
                hint="validate updates with partition_updates before aggregating",
            )
    return layout
