"""`medfed audit trace` on a small real record: real signed ledgers, real global model files,
round records written by the aggregator's own functions; no training."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from audit_support import SITES, TERMS, Federation

from medfed.aggregator.run_store import ReceivedUpdate, RunStore, round_record
from medfed.audit.trace import TraceResult, record_sha256, trace_model
from medfed.cli.app import main
from medfed.config.run import RunSettings
from medfed.errors import ConfigError
from medfed.privacy import RoundPlan
from medfed.types import weights_digest
from medfed.workspace import run_paths

RUN = "study"


def _weights(value: float) -> dict[str, np.ndarray]:
    return {"conv.weight": np.full((2, 3), value, dtype=np.float32)}


def _run(federation: Federation, *, bind: bool) -> Path:
    """Two rounds of run ``study``: each site trains from the global model and commits."""
    store = RunStore(paths=run_paths(federation.workspace_dir, RUN))
    store.start(RunSettings(run_name=RUN, rounds=2))
    spec = {"network": "unet"}
    global_weights = _weights(0.0)
    record = round_record(
        run_name=RUN,
        round=0,
        previous=None,
        start_sha256=None,
        global_sha256=weights_digest(global_weights),
        updates={},
    )
    store.save_round(
        round=0, weights=global_weights, spec=spec, strategy_state=None, metadata=record
    )
    model_dir = store.paths.global_model(0)
    for round_index in (1, 2):
        start = weights_digest(global_weights)
        updates: dict[str, ReceivedUpdate] = {}
        for offset, site in enumerate(SITES):
            update = _weights(round_index + offset / 10)
            ledger = federation.site_ledger(site)
            first = len(ledger.verify().entries)
            reservation = ledger.reserve(
                plan=RoundPlan(
                    run_id=RUN,
                    round=round_index,
                    planned_rounds=2,
                    steps=4,
                    sample_rate=0.25,
                    noise_multiplier=1.1,
                    max_grad_norm=1.0,
                ),
                terms=TERMS,
            )
            digests = {"model_sha256": start, "update_sha256": weights_digest(update)}
            ledger.commit(reservation, steps=4, **(digests if bind else {}))
            federation.send(site)
            last = len(ledger.verify().entries) - 1
            updates[site] = ReceivedUpdate(
                update_sha256=weights_digest(update),
                ledger_first_seq=first,
                ledger_last_seq=last,
                commit_seq=last,
            )
        global_weights = _weights(round_index * 10.0)
        record = round_record(
            run_name=RUN,
            round=round_index,
            previous=record,
            start_sha256=start,
            global_sha256=weights_digest(global_weights),
            updates=updates,
        )
        model_dir = store.save_round(
            round=round_index,
            weights=global_weights,
            spec=spec,
            strategy_state=None,
            metadata=record,
        )
    return model_dir


def test_a_bound_run_traces_and_costs_what_the_ledgers_say(federation: Federation) -> None:
    model = _run(federation, bind=True)

    result = trace_model(workspace=federation.workspace_dir, model=model)

    assert isinstance(result, TraceResult)
    assert result.passed, [f.line() for f in result.findings]
    assert result.run_name == RUN and [r["round"] for r in result.rounds] == [0, 1, 2]
    assert result.head == record_sha256(result.rounds[-1])
    assert result.rounds[2]["previous_record_sha256"] == record_sha256(result.rounds[1])
    for spend in result.spends:
        ledger = federation.site_ledger(spend.site_id)
        # the run's commits are the ledgers' last entries: the trace costs the whole ledger
        assert spend.last_seq == len(ledger.verify().entries) - 1
        assert spend.epsilon == ledger.spent() > 0
    assert [s.site_id for s in result.spends] == list(SITES)
    assert result.lines()[-1] == "PASS"
    # a resumed run chains its next record to the record of the round it resumes from
    store = RunStore(paths=run_paths(federation.workspace_dir, RUN))
    point = store.start(RunSettings(run_name=RUN, rounds=3, resume=True))
    assert point is not None and record_sha256(point.record) == result.head


def test_commits_without_digests_do_not_trace(federation: Federation) -> None:
    model = _run(federation, bind=False)

    result = trace_model(workspace=federation.workspace_dir, model=model)

    lines = [f.line() for f in result.findings]
    assert len(lines) == 8, lines  # two rounds x two sites x two fields
    assert lines[0].startswith("FINDING round 1 site site-a: the commit at seq ")
    assert "has model_sha256 None where the round record has " in lines[0]
    assert "has update_sha256 None where the round record has " in lines[1]


def test_a_run_without_round_records_is_a_finding(federation: Federation) -> None:
    store = RunStore(paths=run_paths(federation.workspace_dir, "old"))
    store.start(RunSettings(run_name="old", rounds=1))
    model = store.save_round(
        round=0, weights=_weights(0.0), spec={}, strategy_state=None, metadata={"round": 0}
    )

    result = trace_model(workspace=federation.workspace_dir, model=model, run_name="old")

    assert [f.line() for f in result.findings] == [
        "FINDING round 0: no round record (run_name, previous_record_sha256, global_sha256, "
        "updates missing)",
        "FINDING run 'old' has no global model with a round record",
    ]
    with pytest.raises(ConfigError, match="the model names no run"):
        trace_model(workspace=federation.workspace_dir, model=model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --model DIR and --model-version"),
        (("--model-version", "medfed-study"), "is not NAME/VERSION"),
        (("--model-version", "x/1", "--site-ledger", "site-a"), "is not SITE=PATH"),
    ],
)
def test_usage_mistakes_are_one_line(
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    workspace = str(federation.workspace_dir)
    monkeypatch.setattr(sys, "argv", ["medfed", "audit", "trace", "--workspace", workspace, *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    assert exited.value.code == ConfigError.exit_code, out + err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
