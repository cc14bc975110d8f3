"""The independent recomputation: Opacus and dp-accounting, against published figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from medfed.audit.accounting import (
    INTEGER_ORDER_TOLERANCE,
    INTEGER_ORDERS,
    cumulative_opacus_rdp,
    dp_accounting_rdp,
    opacus_rdp,
    recompute,
)
from medfed.privacy import DPSteps, compute_epsilon

VECTORS = Path(__file__).resolve().parents[2] / "data" / "privacy_vectors.csv"


def _rows() -> list[dict[str, str]]:
    with VECTORS.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _history(row: dict[str, str]) -> list[DPSteps]:
    return [
        DPSteps(
            noise_multiplier=float(row["noise_multiplier"]),
            sample_rate=float(row["sample_rate"]),
            steps=int(row["steps"]),
        )
    ]


@pytest.mark.parametrize("row", _rows(), ids=lambda row: row["id"])
def test_both_libraries_agree_at_shared_integer_orders(row: dict[str, str]) -> None:
    history, delta = _history(row), float(row["delta"])
    opacus = opacus_rdp(history=history, delta=delta, orders=INTEGER_ORDERS)
    google = dp_accounting_rdp(history=history, delta=delta, orders=INTEGER_ORDERS)
    assert abs(google - opacus) / opacus <= INTEGER_ORDER_TOLERANCE


def test_every_accountant_of_a_published_figure() -> None:
    [row] = [row for row in _rows() if row["id"] == "Opacus-test-rdp"]
    eps = recompute(history=_history(row), delta=float(row["delta"]))
    assert eps.opacus_rdp == pytest.approx(float(row["eps_rdp_opacus"]), rel=1e-5)
    assert eps.pld == pytest.approx(float(row["eps_pld_dp_accounting"]), rel=0.01)
    assert eps.dp_accounting_rdp == pytest.approx(eps.opacus_rdp, rel=1e-3)
    assert eps.dp_accounting_rdp_integer == pytest.approx(eps.opacus_rdp_integer, rel=1e-12)
    assert eps.pld < eps.opacus_rdp < eps.rdp_classic


@pytest.mark.parametrize(
    "row",
    [row for row in _rows() if "dp_accounting default orders" in row["published_accountant"]],
    ids=lambda row: row["id"],
)
def test_dp_accounting_rdp_reproduces_tf_privacy(row: dict[str, str]) -> None:
    """TF Privacy's figures are dp-accounting's RDP with its default orders: ours too."""
    value = dp_accounting_rdp(history=_history(row), delta=float(row["delta"]))
    published = row["published_eps"]
    printed = 0.5 * 10.0 ** -len(published.partition(".")[2])  # half its last printed digit
    assert value == pytest.approx(float(published), rel=1e-6, abs=printed)


def test_fractional_orders_are_looser_in_dp_accounting() -> None:
    """At a large sampling rate dp-accounting bounds fractional orders from above (documented)."""
    history = [DPSteps(noise_multiplier=0.94, sample_rate=4 / 13, steps=6)]
    eps = recompute(history=history, delta=1e-5)
    assert eps.dropped_orders > 0
    assert eps.opacus_rdp < eps.dp_accounting_rdp < eps.opacus_rdp * 1.001
    assert math.isclose(eps.opacus_rdp, 7.16623209246934, rel_tol=1e-9)


def test_the_cumulative_curve_ends_at_the_ledgers_epsilon() -> None:
    history = [
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=60),
        DPSteps(noise_multiplier=1.5, sample_rate=0.02, steps=100),
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=0),
        DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=40),
    ]
    curve = cumulative_opacus_rdp(history=history, delta=1e-5)
    assert len(curve) == 4 and curve[1] == curve[2]
    for index, value in enumerate(curve):
        expected = compute_epsilon(history=history[: index + 1], delta=1e-5, accountant="rdp")
        assert value == pytest.approx(expected, rel=1e-12)
    assert curve == sorted(curve)


def test_an_empty_history_spends_nothing() -> None:
    eps = recompute(history=[], delta=1e-5)
    assert (eps.opacus_rdp, eps.dp_accounting_rdp, eps.pld) == (0.0, 0.0, 0.0)
    assert cumulative_opacus_rdp(history=[], delta=1e-5) == [0.0]


def test_negligible_privacy_loss_is_no_disagreement() -> None:
    """dp-accounting answers 0 when every RDP value is below delta^2 (its KL shortcut)."""
    from medfed.audit.findings import Collector
    from medfed.audit.sites import check_libraries

    eps = recompute(history=[DPSteps(noise_multiplier=1e4, sample_rate=0.01, steps=10)], delta=1e-5)
    assert eps.dp_accounting_rdp_integer == 0.0 < eps.opacus_rdp_integer
    collect = Collector()
    check_libraries(site_id="a", eps=eps, collect=collect)
    assert not collect.findings and "KL bound" in collect.checks[0].detail
