"""The per-round plots come from the run's events, resumed runs included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tracking_support import CAPS, ROUNDS, SITES, FakeRun

from medfed.tracking.plots import series_from_events, write_plots


def test_series_follow_the_global_model_of_each_round(fake_run: Callable[..., FakeRun]) -> None:
    run = fake_run()
    series = series_from_events(run.events())
    # round r's dice_before measures the model after round r-1; the evaluation the last one
    assert series.dice_global == pytest.approx({0: 0.1, 1: 0.2, ROUNDS: 0.42})
    assert series.dice_sites["site-a"] == pytest.approx({0: 0.1, 1: 0.2, ROUNDS: 0.42})
    assert series.dice_sites["site-b"] == pytest.approx({0: 0.11, 1: 0.21})
    for site in SITES:
        assert series.epsilon_sites[site] == {r: run.epsilon(site, r) for r in (1, 2)}
    assert series.caps == CAPS


def test_plots_are_png_files(fake_run: Callable[..., FakeRun], tmp_path: Path) -> None:
    run = fake_run()
    written = write_plots(series=series_from_events(run.events()), directory=tmp_path / "p")
    assert [p.name for p in written] == ["dice.png", "epsilon.png"]
    for path in written:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000
    empty = write_plots(series=series_from_events([]), directory=tmp_path / "empty")
    assert all(p.is_file() for p in empty)
