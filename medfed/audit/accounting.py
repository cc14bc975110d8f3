"""Epsilon of a ledger's history, recomputed with two independent libraries.

* **Opacus RDP** (``opacus_rdp``): what medfed's sites and aggregator use
  (:func:`medfed.privacy.compute_epsilon` with ``rdp``): Opacus' default orders 1.1-10.9 and
  12-63, the improved RDP-to-epsilon conversion of Balle et al. 2020.
* **dp-accounting RDP** (``dp_accounting_rdp``): Google's ``dp_accounting.rdp.RdpAccountant``
  fed one ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` per history item, with its own
  default orders and its own conversion (``compute_epsilon``: the same improved conversion,
  Prop. 12 of arXiv:2004.00010, plus a KL shortcut to 0 for tiny curves).
* **dp-accounting PLD** (``pld``): the privacy-loss-distribution accountant, a tighter bound
  that should not exceed RDP.

The two RDP numbers do not come out equal, for reasons of theory, not of bugs (measured on real
ledgers and on the published test vectors): at integer orders both libraries evaluate the same
exact binomial series and agree to about 1e-13 relative; at fractional orders dp-accounting
0.6 adds the *absolute values* of the alternating series' terms (a valid but looser upper bound,
up to 40% above the exact value at orders below 2, and orders whose series does not converge in
1000 terms are dropped), while Opacus sums the signed terms (it matches numerical integration
to 1e-10); and dp-accounting also has orders 11 and 128-1024, which Opacus lacks, so for large
noise it can be much lower. The cross-check that can fail is therefore the one at the shared
integer orders (``*_integer``): Opacus and dp-accounting must agree there within
:data:`INTEGER_ORDER_TOLERANCE`. The default-order numbers are reported side by side.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from medfed.numbers import finite_or_none
from medfed.privacy.accounting import AccountantName, DPSteps, compute_epsilon, conversion_of
from medfed.privacy.ledger import LedgerReport

# Orders at which both libraries evaluate the exact (integer-order) binomial series.
INTEGER_ORDERS: Final[tuple[int, ...]] = (*range(2, 64), 128, 256, 512, 1024)
# Measured: at most 4e-13 relative on the published vectors and demo ledgers.
INTEGER_ORDER_TOLERANCE: Final = 1e-8
# PLD is the tighter accountant: above RDP by more than this is a finding.
PLD_ABOVE_RDP_TOLERANCE: Final = 0.01

ACCOUNTANT_DESCRIPTIONS: Final[dict[str, str]] = {
    "opacus_rdp": f"Opacus RDP; {conversion_of('rdp')}",
    "dp_accounting_rdp": (
        "dp-accounting RdpAccountant; rdp-improved (Balle et al. 2020, Prop. 12 of "
        "arXiv:2004.00010) with dp-accounting's default orders 1.1-10.9, 11-63, 128-1024; "
        "fractional orders bounded by the absolute binomial series"
    ),
    "opacus_rdp_integer": "Opacus RDP at integer orders 2-63, 128-1024; rdp-improved",
    "dp_accounting_rdp_integer": (
        "dp-accounting RdpAccountant at integer orders 2-63, 128-1024; rdp-improved"
    ),
    "pld": f"dp-accounting PLD; {conversion_of('pld')}",
    "rdp_classic": f"Opacus RDP; {conversion_of('rdp-classic')}",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Epsilons:
    """One history's epsilon at ``delta`` from each accountant (``inf``: no finite bound)."""

    delta: float
    opacus_rdp: float
    dp_accounting_rdp: float
    opacus_rdp_integer: float
    dp_accounting_rdp_integer: float
    pld: float
    rdp_classic: float
    dropped_orders: int = 0  # fractional orders dp-accounting left out (no convergence)

    def to_json(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "opacus_rdp": finite_or_none(self.opacus_rdp),
            "dp_accounting_rdp": finite_or_none(self.dp_accounting_rdp),
            "opacus_rdp_integer": finite_or_none(self.opacus_rdp_integer),
            "dp_accounting_rdp_integer": finite_or_none(self.dp_accounting_rdp_integer),
            "pld": finite_or_none(self.pld),
            "rdp_classic": finite_or_none(self.rdp_classic),
            "dp_accounting_dropped_orders": self.dropped_orders,
            "accountants": dict(ACCOUNTANT_DESCRIPTIONS),
        }


LOCAL_LABEL: Final = "local epsilon (own noise alone)"
GAUSSIAN_EQUIVALENT_NOTE: Final = (
    "distributed-noise steps are charged at Gaussian equivalents that bound their RDP (first "
    "bound of Prop. 14, Kairouz, Liu, Steinke 2021): the RDP numbers bound them, the PLD "
    "number is that of the Gaussian equivalents and does not"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedEpsilons:
    """A ledger with distributed discrete Gaussian steps: its epsilon under each guarantee.

    ``distributed``: every such step counted at its distributed guarantee (its ``sites``
    shares were added and secure aggregation held); ``local``: at the site's own share alone
    (the other sites colluded with the aggregator). Other entries count as they do for the
    budget. ``budget`` names the guarantee(s) the entries' budget was enforced on, in ledger
    order; ``sites`` the shares the distributed guarantee counts on.
    """

    accountant: str
    delta: float
    distributed: float
    local: float
    budget: tuple[str, ...]
    sites: tuple[int, ...]
    seqs: tuple[int, ...]

    @property
    def distributed_label(self) -> str:
        shares = " or ".join(str(k) for k in self.sites)
        return f"distributed epsilon ({shares} sites and secure aggregation hold)"

    @property
    def enforced_on(self) -> str:
        """Which epsilon the site's budget was enforced on, in words."""
        return " and ".join(f"{view} epsilon" for view in self.budget)

    def to_json(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "distributed": finite_or_none(self.distributed),
            "distributed_label": self.distributed_label,
            "local": finite_or_none(self.local),
            "local_label": LOCAL_LABEL,
            "budget_enforced_on": list(self.budget),
            "sites": list(self.sites),
            "seqs": list(self.seqs),
            "note": GAUSSIAN_EQUIVALENT_NOTE,
        }


def distributed_epsilons(
    *, reports: Sequence[LedgerReport], delta: float, accountant: AccountantName
) -> DistributedEpsilons | None:
    """Both guarantees' epsilon of a site's ledgers (the larger of each), or None without
    distributed-noise steps.

    Like the spent epsilon, each view is the larger of the ledgers' (the aggregator's copy
    and the site's own may differ by the rounds the aggregator has not seen); the plans are
    read from the ledger that holds the most entries.
    """
    holding = [report for report in reports if report.has_distributed]
    if not holding:
        return None
    longest = max(holding, key=lambda report: len(report.entries))
    plans = longest.distributed_plans
    each = [report.view_epsilons(delta=delta, accountant=accountant) for report in reports]
    return DistributedEpsilons(
        accountant=accountant,
        delta=delta,
        distributed=max(views["distributed"] for views in each),
        local=max(views["local"] for views in each),
        budget=tuple(dict.fromkeys(plan.budget for plan in plans.values())),
        sites=tuple(sorted({plan.sites for plan in plans.values()})),
        seqs=tuple(plans),
    )


def recompute(*, history: Sequence[DPSteps], delta: float) -> Epsilons:
    """Every accountant's epsilon for ``history`` at ``delta`` (about 1 s per distinct history).

    Pure and deterministic, so results are kept for the process: an audit and the report built
    on it, or several ledgers with the same history, compute each history once.
    """
    return _recompute(tuple(history), float(delta))


@functools.lru_cache(maxsize=256)
def _recompute(history: tuple[DPSteps, ...], delta: float) -> Epsilons:
    if not any(item.steps for item in history):
        zero = 0.0
        return Epsilons(
            delta=delta,
            opacus_rdp=zero,
            dp_accounting_rdp=zero,
            opacus_rdp_integer=zero,
            dp_accounting_rdp_integer=zero,
            pld=zero,
            rdp_classic=zero,
        )
    with quiet_accounting() as dropped:
        return Epsilons(
            delta=delta,
            opacus_rdp=compute_epsilon(history=history, delta=delta, accountant="rdp"),
            dp_accounting_rdp=dp_accounting_rdp(history=history, delta=delta),
            opacus_rdp_integer=opacus_rdp(history=history, delta=delta, orders=INTEGER_ORDERS),
            dp_accounting_rdp_integer=dp_accounting_rdp(
                history=history, delta=delta, orders=INTEGER_ORDERS
            ),
            pld=compute_epsilon(history=history, delta=delta, accountant="pld"),
            rdp_classic=compute_epsilon(history=history, delta=delta, accountant="rdp-classic"),
            dropped_orders=len(set(dropped)),
        )


def dp_accounting_rdp(
    *, history: Sequence[DPSteps], delta: float, orders: Sequence[float] | None = None
) -> float:
    """Epsilon from ``dp_accounting.rdp.RdpAccountant`` (add/remove-one adjacency)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(
        orders=None if orders is None else [float(order) for order in orders],
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )
    for item in history:
        if item.steps:
            event = dp_accounting.PoissonSampledDpEvent(
                item.sample_rate, dp_accounting.GaussianDpEvent(item.noise_multiplier)
            )
            accountant.compose(event, item.steps)
    return float(accountant.get_epsilon(delta))


def opacus_rdp(*, history: Sequence[DPSteps], delta: float, orders: Sequence[float]) -> float:
    """Epsilon from Opacus' RDP analysis at ``orders`` (improved conversion)."""
    return cumulative_opacus_rdp(history=history, delta=delta, orders=orders)[-1]


def cumulative_opacus_rdp(
    *, history: Sequence[DPSteps], delta: float, orders: Sequence[float] | None = None
) -> list[float]:
    """Opacus-RDP epsilon after each item of ``history`` (the last one is the whole history).

    RDP is additive in steps, so each distinct (noise, rate) is evaluated once for one step and
    the curve is accumulated: a long ledger's epsilon-over-rounds costs one conversion per item.
    The one-step curves are kept for the process: the sites of a federation mostly share their
    settings, and a report of a thousand sites then computes them once, not a thousand times.
    """
    import numpy as np

    from medfed.privacy.accounting import _opacus_rdp, one_step_rdp

    rdp = _opacus_rdp()
    if orders is None:
        from opacus.accountants.rdp import RDPAccountant

        orders = RDPAccountant.DEFAULT_ALPHAS
    grid = [float(order) for order in orders]
    curve = np.zeros(len(grid))
    epsilons: list[float] = []
    with quiet_accounting():
        for item in history:
            if item.steps:
                curve = curve + item.steps * one_step_rdp(
                    noise_multiplier=item.noise_multiplier,
                    sample_rate=item.sample_rate,
                    orders=grid,
                )
            if not curve.any():
                epsilons.append(0.0)
                continue
            epsilon, _ = rdp.get_privacy_spent(orders=grid, rdp=curve, delta=delta)
            epsilons.append(float(epsilon) if not math.isnan(epsilon) else math.inf)
    return epsilons or [0.0]


@contextlib.contextmanager
def quiet_accounting() -> Iterator[list[str]]:
    """Silence the libraries' chatter while computing; yields the orders dp-accounting dropped.

    Opacus warns when the best order is at the end of its grid; dp-accounting logs (through
    absl) each fractional order whose series did not converge, which it then leaves out.
    """
    dropped: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "failed to converge" in message:
                dropped.append(message)

    logger = logging.getLogger("absl")
    handler = _Collect(level=logging.WARNING)
    saved_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield dropped
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved_propagate
