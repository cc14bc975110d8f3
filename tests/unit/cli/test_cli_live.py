"""`medfed run` and `medfed demo` on a terminal: lines per event, a live table only where a
person watches, and a final table whose notes say what happened to each site."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import pytest
from rich.console import Console

from medfed.cli.live import RunProgress, live_wanted
from medfed.cli.progress import print_summary
from medfed.run_events import (
    RoundStarted,
    RunFinished,
    RunStarted,
    SiteDeclined,
    SitesOnline,
    SiteUpdated,
)

ESCAPE = "\x1b["


def _console(*, terminal: bool, width: int = 100) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=width, highlight=False, markup=False)
    return console, out


def _site(site_id: str, status: str, reason: str = "") -> dict[str, Any]:
    return {
        "site_id": site_id,
        "status": status,
        "rounds": 3,
        "patients": 10,
        "dice": 0.5,
        "reason": reason,
        "epsilon_spent": 7.2,
        "epsilon_cap": 8.0,
        "delta": 1e-5,
    }


def _summary(*sites: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_name": "demo",
        "status": "finished",
        "sites": list(sites),
        "rounds_completed": 3,
        "dice_initial": 0.05,
        "dice_final": 0.5,
        "model": None,
    }


def test_piped_output_is_one_plain_line_per_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    console, out = _console(terminal=False)
    with RunProgress(console) as progress:
        assert not progress.live
        progress(RunStarted(run_name="demo", rounds=3, sites=("site-a", "site-b")))
        progress(SiteUpdated(run_name="demo", site="site-a", round=1, patients=10, loss=0.5))
    lines = out.getvalue().splitlines()
    assert lines == [
        "run demo: 3 rounds, sites site-a, site-b",
        "  site-a: 10 patients, loss 0.500, Dice of the global model n/a, epsilon n/a / n/a",
    ]
    assert ESCAPE not in out.getvalue()


def test_ci_gets_no_live_table_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    console, _ = _console(terminal=True)
    monkeypatch.setenv("CI", "true")
    assert not live_wanted(console)
    monkeypatch.delenv("CI")
    assert live_wanted(console)
    monkeypatch.setenv("TERM", "dumb")
    assert not live_wanted(_console(terminal=True)[0])


def test_a_terminal_shows_the_sites_table_and_its_clock_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    console, out = _console(terminal=True)
    now = time.time()
    with RunProgress(console) as progress:
        assert progress.live
        progress(RunStarted(run_name="demo", time=now, rounds=3, sites=("site-a", "site-b")))
        progress(SitesOnline(run_name="demo", time=now, online=("site-a", "site-b")))
        progress(RoundStarted(run_name="demo", time=now, round=1, sites=("site-a", "site-b")))
        moved = re.compile(r"│ site-b │ training │ ([2-9]|\d\d+) s")
        deadline = time.monotonic() + 10
        while not moved.search(out.getvalue()) and time.monotonic() < deadline:
            time.sleep(0.2)  # no event comes: the table is redrawn about once a second
    text = out.getvalue()
    assert moved.search(text)
    assert re.search(r"run demo: round 1 of 3, ([2-9]|\d\d+) s", text)
    assert "round 1: training at site-a, site-b" in text  # the event line is there as well


def test_the_final_table_names_what_became_of_each_site() -> None:
    console, out = _console(terminal=False, width=140)
    summary = _summary(
        _site("site-a", "active"),
        _site("site-b", "exhausted", "another round would pass its privacy cap"),
        _site("site-c", "declined", "the run is not accepted"),
    )
    notes = {"site-c": "declined round 2 [policy]: the run is not accepted"}
    print_summary(console, summary, notes=notes)
    rows = {
        line.split("│")[1].strip(): line
        for line in out.getvalue().splitlines()
        if "│ site-" in line
    }
    assert "│ done " in rows["site-a"]
    assert "│ budget spent │" in rows["site-b"]
    assert "another round would pass its privacy cap" in rows["site-b"]
    assert "declined round 2 [policy]: the run is not accepted" in rows["site-c"]
    assert "active" not in out.getvalue()


def test_the_note_column_is_left_out_when_no_site_has_one() -> None:
    console, out = _console(terminal=False)
    print_summary(console, _summary(_site("site-a", "active"), _site("site-b", "active")))
    assert "note" not in out.getvalue()
    assert "│ site-a │ done  │" in out.getvalue()


def test_paths_are_printed_whole_on_a_narrow_terminal(tmp_path: Any) -> None:
    console, out = _console(terminal=False, width=80)
    model = "/srv/federations/a-rather-long-study-name/workspace/runs/demo/global/round-0003"
    print_summary(console, {**_summary(_site("site-a", "active")), "model": model})
    assert f"global model: {model}\n" in out.getvalue()


def test_declines_keep_their_code_in_the_line_and_the_table() -> None:
    console, out = _console(terminal=False)
    with RunProgress(console) as progress:
        progress(RunStarted(run_name="demo", rounds=1, sites=("site-a",)))
        progress(
            SiteDeclined(
                run_name="demo", site="site-a", round=1, code="budget", reason="cap reached"
            )
        )
        progress(
            RunFinished(
                run_name="demo",
                reason="done",
                summary=_summary(_site("site-a", "declined", "cap reached")),
            )
        )
    assert "  site-a declined round 1 [budget]: cap reached" in out.getvalue()
    assert progress.board.notes() == {"site-a": "declined round 1 [budget]: cap reached"}


def test_a_phase_is_a_line_and_shows_its_clock_until_the_next_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    console, out = _console(terminal=True)
    with RunProgress(console) as progress:
        progress.phase("starting 3 site nodes (Flower SuperNodes)")
        moved = re.compile(r"SuperNodes\) \([1-9]\d* s\)")
        deadline = time.monotonic() + 10
        while not moved.search(out.getvalue()) and time.monotonic() < deadline:
            time.sleep(0.2)  # redrawn about once a second, its clock with it
        assert moved.search(out.getvalue())
        assert moved.search(progress.activity() or "")
        progress(RunStarted(run_name="demo", rounds=1, sites=("site-a",)))
        assert progress.activity() is None
    assert "starting 3 site nodes (Flower SuperNodes)\n" in out.getvalue()
