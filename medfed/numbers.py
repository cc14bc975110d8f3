"""Numbers as medfed stores them: JSON has no NaN or infinity, so a missing, undefined or
unbounded number (a withheld Dice, an epsilon without bound) is written as null."""

from __future__ import annotations

import math

import numpy as np


def as_float(value: object) -> float | None:
    """A real number (Python or numpy, not a bool) as a float; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.generic):
        return None
    if isinstance(value, np.generic) and not isinstance(value, np.integer | np.floating):
        return None
    return float(value)


def finite_or_none(value: object) -> float | None:
    """``value`` as a float when it is a finite real number, else None."""
    number = as_float(value)
    return number if number is not None and math.isfinite(number) else None
