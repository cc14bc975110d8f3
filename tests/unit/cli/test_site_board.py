"""The sites' table follows a run's events: states, clocks, estimates, notes, final states."""

from __future__ import annotations

from typing import Any

from medfed.api.site_board import BoardRow, RoundBoard
from medfed.run_events import (
    PrivacyAlert,
    RoundDone,
    RoundStarted,
    RunFinished,
    RunStarted,
    RunStopped,
    SiteDeclined,
    SiteExhausted,
    SiteReplied,
    SitesOnline,
    SiteTimeout,
    SiteUpdated,
    parse_event,
)

T0 = 1_000_000.0
RUN = "study"


def _site(site_id: str, status: str, reason: str = "") -> dict[str, Any]:
    return {
        "site_id": site_id,
        "status": status,
        "rounds": 2,
        "patients": 10,
        "dice": 0.5,
        "reason": reason,
        "epsilon_spent": 3.0,
        "epsilon_cap": 8.0,
    }


def _rows(board: RoundBoard, now: float) -> dict[str, BoardRow]:
    return {row.site: row for row in board.rows(now=now)}


def _started(board: RoundBoard) -> None:
    board.update(RunStarted(run_name=RUN, time=T0, rounds=2, sites=("a", "b", "c")), received=T0)
    board.update(
        SitesOnline(run_name=RUN, time=T0 + 1, online=("a", "b"), missing=("c",)),
        received=T0 + 1,
    )


def test_a_round_shows_each_site_training_with_its_clock_then_its_reply() -> None:
    board = RoundBoard()
    _started(board)
    rows = _rows(board, T0 + 2)
    assert [rows[s].state for s in "abc"] == ["online", "online", "offline"]
    assert rows["c"].note == "not online when the run started"
    assert "asking for the initial model" in board.title(now=T0 + 2)

    board.update(RoundStarted(run_name=RUN, time=T0 + 10, round=1, sites=("a", "b")))
    rows = _rows(board, T0 + 22)
    assert (rows["a"].state, rows["a"].time) == ("training", "12 s")
    assert board.title(now=T0 + 22) == "run study: round 1 of 2, 12 s"
    assert board.round_running

    board.update(SiteReplied(run_name=RUN, time=T0 + 40, site="a", round=1, message_type="train"))
    board.update(
        SiteUpdated(
            run_name=RUN,
            time=T0 + 41,
            site="a",
            round=1,
            patients=12,
            loss=0.25,
            dice_before=0.1,
            epsilon_spent=2.5,
            epsilon_cap=8.0,
        )
    )
    rows = _rows(board, T0 + 45)
    assert rows["a"] == BoardRow(
        site="a",
        state="replied",
        time="30 s",  # from the request to the reply, not to the reading of it
        patients="12",
        loss="0.250",
        dice="0.100",
        epsilon="2.50 / 8.00",
        note="",
    )
    assert (rows["b"].state, rows["b"].time) == ("training", "35 s")


def test_the_last_answer_is_the_next_rounds_estimate() -> None:
    board = RoundBoard()
    _started(board)
    board.update(RoundStarted(run_name=RUN, time=T0 + 10, round=1, sites=("a", "b")))
    board.update(SiteUpdated(run_name=RUN, time=T0 + 85, site="a", round=1))
    board.update(
        SiteDeclined(
            run_name=RUN, time=T0 + 86, site="b", round=1, code="policy", reason="run not accepted"
        )
    )
    board.update(RoundDone(run_name=RUN, time=T0 + 87, round=1, seconds=77.0))
    assert board.title(now=T0 + 90) == "run study: round 1 of 2 done"
    assert _rows(board, T0 + 90)["b"].note == "declined round 1 [policy]: run not accepted"

    board.update(RoundStarted(run_name=RUN, time=T0 + 100, round=2, sites=("a",)))
    rows = _rows(board, T0 + 105)
    assert rows["a"].time == "5 s (last 75 s)"
    assert board.title(now=T0 + 105) == "run study: round 2 of 2, 5 s (the last round took 77 s)"
    board.update(RoundDone(run_name=RUN, time=T0 + 180, round=2, seconds=80.0))
    assert "final evaluation" in board.title()


def test_clocks_use_the_aggregators_time_wherever_this_machine_is() -> None:
    board = RoundBoard()
    skew = 3600.0  # the aggregator's clock is an hour behind this machine's
    board.update(RunStarted(run_name=RUN, time=T0, rounds=1, sites=("a",)), received=T0 + skew)
    board.update(
        RoundStarted(run_name=RUN, time=T0 + 5, round=1, sites=("a",)), received=T0 + skew + 5.5
    )
    assert _rows(board, T0 + skew + 25.5)["a"].time == "20 s"


def test_timeouts_spent_budgets_and_alerts_are_noted() -> None:
    board = RoundBoard()
    _started(board)
    board.update(SiteTimeout(run_name=RUN, time=T0 + 2, site="b", round=0, message_type="init"))
    board.update(RoundStarted(run_name=RUN, time=T0 + 10, round=1, sites=("a",)))
    board.update(PrivacyAlert(run_name=RUN, time=T0 + 11, site="a", round=1, alert="cap raised"))
    board.update(SiteTimeout(run_name=RUN, time=T0 + 910, site="a", round=1, message_type="train"))
    board.update(
        SiteExhausted(run_name=RUN, time=T0 + 911, site="c", reason="another round would pass")
    )
    rows = _rows(board, T0 + 920)
    assert (rows["a"].state, rows["a"].time) == ("timed out", "15 min 00 s")
    assert rows["a"].note == "no reply to round 1"
    assert rows["b"].note == "no reply to the initial model"
    assert (rows["c"].state, rows["c"].note) == ("budget spent", "another round would pass")

    # A site asked again starts afresh; an alert stays until the run ends.
    board.update(PrivacyAlert(run_name=RUN, time=T0 + 921, site="b", round=1, alert="delta"))
    board.update(RoundStarted(run_name=RUN, time=T0 + 930, round=2, sites=("a", "b")))
    rows = _rows(board, T0 + 931)
    assert rows["a"].note == ""
    assert rows["b"].note == "PRIVACY ALERT: delta"
    assert board.notes() == {"b": "PRIVACY ALERT: delta", "c": "another round would pass"}


def test_the_end_gives_every_site_its_final_state() -> None:
    board = RoundBoard()
    _started(board)
    board.update(SiteTimeout(run_name=RUN, time=T0 + 2, site="b", round=1, message_type="train"))
    summary = {
        "sites": [
            _site("a", "active"),
            _site("b", "offline", "no reply to train within 900 s"),
            _site("c", "exhausted", "another round would pass its privacy cap"),
        ]
    }
    board.update(RunFinished(run_name=RUN, time=T0 + 5, reason="all rounds done", summary=summary))
    rows = _rows(board, T0 + 6)
    assert [rows[s].state for s in "abc"] == ["done", "timed out", "budget spent"]
    assert rows["c"].note == "another round would pass its privacy cap"
    assert board.title() == "run study: finished: all rounds done"
    assert board.finished and not board.round_running

    stopped = RoundBoard()
    _started(stopped)
    stopped.update(
        RunStopped(run_name=RUN, reason="too few", summary={"sites": [_site("a", "active")]})
    )
    assert _rows(stopped, T0)["a"].state == "stopped"


def test_a_reply_received_is_an_event_of_its_own_kind() -> None:
    event = SiteReplied(run_name=RUN, time=T0, site="a", round=3, message_type="train")
    line = event.to_json()
    assert line["event"] == "site_replied"
    assert parse_event(line) == event
