"""Published DP-SGD privacy figures reproduce with every accountant medfed offers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medfed.privacy import DPSteps, compute_epsilon

VECTORS = Path(__file__).resolve().parents[2] / "data" / "privacy_vectors.csv"

# Relative tolerances (tests/data/README.md): 0.5% between RDP implementations, 1% for PLD.
RDP_TOLERANCE = 0.005
PLD_TOLERANCE = 0.01
# Opacus' PRV accountant reproduces the PRV rows to about 1e-7 relative; 1e-4 leaves room for
# FFT and platform differences while still catching any change of method or parameters.
PRV_TOLERANCE = 1e-4


def _rows() -> list[dict[str, str]]:
    with VECTORS.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


ROWS = _rows()


def _history(row: dict[str, str]) -> list[DPSteps]:
    return [
        DPSteps(
            noise_multiplier=float(row["noise_multiplier"]),
            sample_rate=float(row["sample_rate"]),
            steps=int(row["steps"]),
        )
    ]


def _by_id(accountant_prefix: str) -> list[object]:
    return [
        pytest.param(row, id=row["id"])
        for row in ROWS
        if row["published_accountant"].startswith(accountant_prefix)
    ]


def test_vector_file_is_complete() -> None:
    assert len(ROWS) == 12
    assert all(row["source"] for row in ROWS)
    assert len({row["id"] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", [pytest.param(row, id=row["id"]) for row in ROWS])
def test_rdp_reproduces_opacus_column(row: dict[str, str]) -> None:
    epsilon = compute_epsilon(history=_history(row), delta=float(row["delta"]), accountant="rdp")
    assert epsilon == pytest.approx(float(row["eps_rdp_opacus"]), rel=RDP_TOLERANCE)


@pytest.mark.parametrize("row", [pytest.param(row, id=row["id"]) for row in ROWS])
def test_pld_reproduces_dp_accounting_column(row: dict[str, str]) -> None:
    epsilon = compute_epsilon(history=_history(row), delta=float(row["delta"]), accountant="pld")
    assert epsilon == pytest.approx(float(row["eps_pld_dp_accounting"]), rel=PLD_TOLERANCE)


@pytest.mark.parametrize("row", [pytest.param(row, id=row["id"]) for row in ROWS])
def test_second_rdp_implementation_agrees(row: dict[str, str]) -> None:
    """dp-accounting's own RDP accountant (its default orders) agrees with ours within 0.5%."""
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(row["sample_rate"]), dp_accounting.GaussianDpEvent(float(row["noise_multiplier"]))
        ),
        int(row["steps"]),
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    independent = accountant.get_epsilon(float(row["delta"]))
    ours = compute_epsilon(history=_history(row), delta=float(row["delta"]), accountant="rdp")
    assert ours == pytest.approx(independent, rel=RDP_TOLERANCE)


@pytest.mark.parametrize("row", _by_id("PRV"))
def test_prv_reproduces_published(row: dict[str, str]) -> None:
    epsilon = compute_epsilon(history=_history(row), delta=float(row["delta"]), accountant="prv")
    assert epsilon == pytest.approx(float(row["published_eps"]), rel=PRV_TOLERANCE)


@pytest.mark.parametrize("row", _by_id("PLD"))
def test_pld_reproduces_published(row: dict[str, str]) -> None:
    epsilon = compute_epsilon(history=_history(row), delta=float(row["delta"]), accountant="pld")
    assert epsilon == pytest.approx(float(row["published_eps"]), rel=PLD_TOLERANCE)


@pytest.mark.parametrize("row", _by_id("RDP"))
def test_rdp_reproduces_published(row: dict[str, str]) -> None:
    """Every published RDP number reproduces with the improved or the classic conversion."""
    delta, published = float(row["delta"]), float(row["published_eps"])
    improved = compute_epsilon(history=_history(row), delta=delta, accountant="rdp")
    classic = compute_epsilon(history=_history(row), delta=delta, accountant="rdp-classic")
    assert classic > improved
    matches = [
        name
        for name, value in (("rdp", improved), ("rdp-classic", classic))
        if value == pytest.approx(published, rel=RDP_TOLERANCE)
    ]
    assert matches, f"published {published}: improved {improved}, classic {classic}"
