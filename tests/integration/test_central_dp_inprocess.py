"""A federation with site-level central DP and a moving average of its global models, run
in-process through the real round loop and ClientApp (real DP-SGD and ledgers at the sites)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medfed.api.demo import prepare_federation
from medfed.audit.trace import trace_model
from medfed.config.run import parse_run_settings
from medfed.model_average import ModelAverage
from medfed.model_files import read_model
from medfed.privacy import DPSteps, compute_epsilon
from medfed.tracking.uri import default_tracking_uri
from medfed.transport.inprocess import run_in_process
from medfed.types import weights_digest

pytestmark = pytest.mark.slow

NOISE, CLIP = 0.8, 0.3


def test_central_dp_is_accounted_apart_and_the_average_is_the_final_model(
    tmp_path: Path,
) -> None:
    setup = prepare_federation(
        root=tmp_path / "fed", sites=3, cases=16, size=32, rounds=2, local_epochs=1
    )
    settings = parse_run_settings(
        {
            **setup.settings.model_dump(mode="json"),
            "strategy": {
                "name": "fedadam",
                "server_lr": 0.05,
                "central_dp": {"noise_multiplier": NOISE, "clip_norm": CLIP, "delta": 1e-4},
            },
            "ema": {"decay": 0.5},
        }
    )
    tracking_uri = default_tracking_uri(workspace_root=setup.workspace.root)
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=settings,
        tracking_uri=tracking_uri,
    )
    assert result.status == "finished", result.reason
    run_dir = setup.workspace.root / "runs" / settings.run_name

    # the site-level ledger: one Gaussian release per round, over the cohort of 3 sites
    lines = (run_dir / "site_level_ledger.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    # handed to an auditor with the run's report, beside the sites' ledgers
    copied = run_dir / "report" / "ledgers" / "site_level_ledger.jsonl"
    assert copied.read_text().splitlines() == lines
    assert [(e["round"], e["cohort"], e["unit"]) for e in entries] == [
        (1, 3, "site"),
        (2, 3, "site"),
    ]
    expected = compute_epsilon(
        history=[DPSteps(noise_multiplier=NOISE, sample_rate=1.0, steps=2)],
        delta=1e-4,
        accountant="rdp",
    )
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    site_level = [e for e in events if e["event"] == "site_level_privacy"]
    assert [e["round"] for e in site_level] == [1, 2]
    assert site_level[-1]["site_level_epsilon"] == pytest.approx(expected, rel=1e-12)
    assert site_level[-1]["delta"] == 1e-4

    # the summary keeps it apart from the sites' patient-level budgets
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["site_level_privacy"]["site_level_epsilon"] == pytest.approx(expected)
    assert summary["site_level_privacy"]["unit"] == "site"
    for site in summary["sites"]:
        assert 0 < site["epsilon_spent"] <= site["epsilon_cap"]
        assert site["epsilon_spent"] != pytest.approx(expected)

    # the released model is the average of the two rounds' global models
    rounds = [read_model(run_dir / "global" / f"round-{i:04d}").weights for i in (1, 2)]
    average = ModelAverage(decay=0.5)
    for index, weights in enumerate(rounds, start=1):
        average.add(round=index, weights=weights)
    final = read_model(Path(summary["model"]))
    assert Path(summary["model"]).name == "ema-model"
    assert weights_digest(final.weights) == weights_digest(average.weights())
    assert final.metadata["ema"]["global_sha256"] == [weights_digest(w) for w in rounds]
    for name, array in rounds[1].items():
        if array.dtype.kind == "f" and array.size > 1:
            assert not np.array_equal(final.weights[name], array)
    evaluation = [e for e in events if e["event"] == "evaluation"]
    assert len(evaluation) == 1 and evaluation[0]["round"] == 2

    # MLflow: the site-level epsilon on the parent run and the version, apart from the sites'
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    info = json.loads((run_dir / "mlflow.json").read_text())
    history = client.get_metric_history(info["parent_run_id"], "site_level_epsilon")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(expected)
    version = client.get_model_version(f"medfed-{settings.run_name}", "1")
    assert float(version.tags["medfed.site_level_epsilon"]) == pytest.approx(expected)
    assert version.tags["medfed.model_sha256"] == weights_digest(final.weights)

    # the registered average traces back to every round and ledger commit behind it
    trace = trace_model(
        workspace=setup.workspace.root,
        model_version=f"medfed-{settings.run_name}/1",
        tracking_uri=tracking_uri,
    )
    assert trace.passed, trace.lines()
    assert [r["round"] for r in trace.rounds] == [0, 1, 2]
