"""What the recipes measured: federated DP Dice over centralised non-private Dice, by setting.

The planner's expected Dice ratio (:func:`medfed.api.planner.recommend_recipe`) is read from
this table and nowhere else, so a new measurement is one new row here, with its source. Every
row is a figure of ``benchmarks/README.md`` ("Utility"), produced by ``benchmarks/utility.py``
on synthetic data: a ratio on real patients may differ, and the planner says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["MEASURED", "MeasuredRatio", "nearest_measurement"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredRatio:
    """One measured setting: its size, its epsilon, its recipe, and the ratio's mean and range."""

    task: str
    sites: int
    patients_per_site: int  # training patients at each site
    epsilon: float  # per site, patient-level, RDP at ``delta``
    delta: float
    recipe: str
    ratio: float  # mean over ``runs``
    low: float
    high: float
    runs: int
    source: str


MEASURED: Final[tuple[MeasuredRatio, ...]] = (
    MeasuredRatio(
        task="shapes",
        sites=3,
        patients_per_site=19,
        epsilon=8.0,
        delta=1e-5,
        recipe="dp-fedadam-one-step",
        # DP Dice 0.725, 0.716, 0.702, 0.653, 0.658, 0.736, 0.685, 0.627 over a centralised
        # 0.8632 (data seed 0) and 0.626, 0.658, 0.544 over 0.8037 (seed 1)
        ratio=0.79,
        low=0.68,
        high=0.85,
        runs=11,
        source="benchmarks/README.md, Utility: 3 sites x 24 synthetic cases at 32^3 (19 "
        "training patients each), 80 one-step rounds, FedAdam 0.05, channels 8,16; every run "
        "of the recipe there, two data seeds",
    ),
    MeasuredRatio(
        task="shapes",
        sites=3,
        patients_per_site=19,
        epsilon=8.0,
        delta=1e-5,
        recipe="dp-fedadam-cosine",
        # DP Dice 0.767, 0.745, 0.756 over a centralised 0.8632 (data seed 0) and 0.687, 0.589,
        # 0.688 over 0.8037 (seed 1)
        ratio=0.845,
        low=0.73,
        high=0.89,
        runs=6,
        source="benchmarks/README.md, Utility, A server rate schedule: 3 sites x 24 synthetic "
        "cases at 32^3 (19 training patients each), 160 one-step rounds, FedAdam 0.05 decaying "
        "along a cosine to 0.005, channels 8,16; every run of the recipe there, two data seeds",
    ),
    *(
        MeasuredRatio(
            task="shapes",
            sites=3,
            patients_per_site=train,
            epsilon=epsilon,
            delta=1e-5,
            recipe="dp-fedadam-one-step",
            ratio=ratio,
            low=ratio if low is None else low,
            high=ratio if high is None else high,
            runs=runs,
            source=f"benchmarks/README.md, Utility as sites grow (utility_curve.py): 3 sites x "
            f"{cases} synthetic cases at 32^3, the recipe at epsilon {epsilon:g}, {runs} run(s)"
            + ("" if low is not None else ", their range not kept"),
        )
        # (cases per site, training patients, epsilon, ratio, lowest, highest, runs)
        for cases, train, epsilon, ratio, low, high, runs in (
            (48, 38, 8.0, 0.817, 0.809, 0.825, 2),
            (96, 77, 8.0, 0.857, 0.850, 0.864, 2),
            (192, 154, 8.0, 0.859, 0.859, 0.859, 1),
            (24, 19, 2.0, 0.686, None, None, 2),
            (48, 38, 2.0, 0.721, 0.676, 0.766, 2),
            (96, 77, 2.0, 0.799, 0.799, 0.799, 2),
            (192, 154, 2.0, 0.798, 0.798, 0.798, 1),
        )
    ),
)


def nearest_measurement(
    *, patients_per_site: int, epsilon: float, recipe: str
) -> tuple[MeasuredRatio, float] | None:
    """The measured row of ``recipe`` closest to the setting, and how far it is.

    Distance is in log patients and log epsilon (a doubling of either counts 1): 0 is the
    setting measured. None when the recipe has no measurement.
    """
    rows = [row for row in MEASURED if row.recipe == recipe]
    if not rows:
        return None

    def distance(row: MeasuredRatio) -> float:
        return math.hypot(
            math.log2(patients_per_site / row.patients_per_site), math.log2(epsilon / row.epsilon)
        )

    best = min(rows, key=distance)
    return best, distance(best)
