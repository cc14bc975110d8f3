"""Distributed noise through the real ServerApp round loop and ClientApp, in one process.

Three synthetic sites whose policies allow distributed noise, secure aggregation on: each site
takes one full-batch step per round, rounds its patients' clipped gradients to the grid and adds
its share of discrete Gaussian noise; the aggregator decodes only the sum. The ledgers record
both guarantees, nothing of a site's count crosses in this run, and a round whose sum would
hold fewer sites' shares than the run counts on is abandoned by the sites themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from event_support import Stopped, stop_after_round
from flwr.app import Context, Message
from scipy import stats
from test_secure_aggregation import SilentGrid

from medfed.aggregator.federation import run_federation
from medfed.api.demo import DEMO_MODEL
from medfed.api.sites import SyntheticSites, make_synthetic_sites
from medfed.audit import build_report, verify_workspace
from medfed.config import load_site_config
from medfed.config.run import RunSettings
from medfed.envelope import TRAIN, read_request, read_secure
from medfed.model_files import read_arrays, read_model
from medfed.privacy import ReleaseEntry, ReserveEntry
from medfed.secagg.grid import grid_for
from medfed.site.clientapp import app as medfed_client_app
from medfed.site.ledger_of import ledger_of
from medfed.transport.inprocess import _task_identity, in_process_nodes, run_in_process

pytestmark = pytest.mark.slow

RUN = "ddg"


def _sites(root: Path) -> SyntheticSites:
    return make_synthetic_sites(
        root=root,
        sites=3,
        cases=12,
        size=32,
        training={"optimizer": "sgd"},
        full_batch=True,
        policy={"distributed_noise": {"allowed": True, "min_sites": 3}},
    )


def _settings(made: SyntheticSites, **changes: Any) -> RunSettings:
    data: dict[str, Any] = {
        "run_name": RUN,
        "rounds": 2,
        "local_epochs": 1,
        "learning_rate": 1.0,
        "max_grad_norm": 0.5,
        "noise_multiplier": 2.0,
        "model": DEMO_MODEL.model_dump(),
        "strategy": {"name": "fedadam", "server_lr": 0.05},
        "min_sites": 3,
        "sites": made.sites,
        "secure_aggregation": True,
        "distributed_noise": {"sites": 3},
    }
    return RunSettings.model_validate({**data, **changes})


def _events(made: SyntheticSites) -> list[dict[str, Any]]:
    path = made.workspace.root / "runs" / RUN / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _site_of(context: Context) -> str:
    return load_site_config(Path(str(context.node_config["site-config"]))).site_id


def test_sites_add_shares_and_the_aggregator_learns_only_the_noisy_sum(tmp_path: Path) -> None:
    made = _sites(tmp_path / "fed")
    settings = _settings(made)
    seen: dict[str, list[Message]] = {}

    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        if message.metadata.message_type == TRAIN:
            stage = read_request(message.content).secure_aggregation or {}
            kind = "evaluation" if stage.get("evaluate") else "round"
            seen.setdefault(_site_of(context), []).append(reply)
            stages.setdefault(_site_of(context), []).append(kind)
        return reply

    stages: dict[str, list[str]] = {}
    result = run_in_process(
        workspace=made.workspace,
        site_configs=made.site_configs,
        settings=settings,
        client_app=client_app,
    )

    assert result.status == "finished" and result.rounds_completed == 2, result.reason
    run_dir = made.workspace.root / "runs" / RUN
    start = read_arrays(run_dir / "global" / "round-0000" / "model.safetensors")
    end = read_arrays(run_dir / "global" / "round-0002" / "model.safetensors")
    assert any(np.any(end[name] != start[name]) for name in start)
    assert all(np.all(np.isfinite(end[name])) for name in end)
    grid = grid_for(
        dim=sum(a.size for a in start.values()),
        clip=0.5,
        count_share=0.25,
        run_id=RUN,
        round_id=1,
    )
    # two masked rounds, then the final model's evaluation as one more masked sum
    assert all(kinds == ["round", "round", "evaluation"] for kinds in stages.values()), stages
    evaluation = next(e for e in _events(made) if e["event"] == "evaluation")
    assert evaluation["sites"] == {} and 0 <= evaluation["dice"] <= 1
    for site, replies in seen.items():
        for reply in replies[:2]:
            assert not reply.has_error(), reply.error
            received = read_secure(reply.content)
            assert received.masked is not None and received.masked.shape == (grid.length,)
            # uniform on [0, 2^32) on its own: the integer sum and count are under the masks
            assert stats.kstest(received.masked / 2.0**32, "uniform").pvalue > 1e-4
            lines = [json.loads(line) for line in received.ledger_lines]
            # This run crosses with its reservation and commit only: no count, loss or Dice.
            run_kinds = {x["kind"] for x in lines if x.get("run_id") == RUN}
            assert run_kinds <= {"reserve"}, run_kinds
        report = ledger_of(load_site_config(made.site_configs[site])).verify()
        reserves = [e for e in report.entries if isinstance(e, ReserveEntry) and e.run_id == RUN]
        assert len(reserves) == 2
        for entry in reserves:
            assert entry.distributed is not None
            assert entry.distributed["sites"] == 3 and entry.distributed["budget"] == "distributed"
            assert entry.sample_rate == 1.0 and entry.steps == 1
            assert entry.noise_multiplier == entry.distributed["distributed_noise_multiplier"]
            local = entry.distributed["local_noise_multiplier"]
            assert local == pytest.approx(entry.noise_multiplier / np.sqrt(3), rel=1e-6)
        distributed = report.history_of("distributed")
        local = report.history_of("local")
        assert report.history == distributed != local
        training = [
            e
            for e in report.entries
            if isinstance(e, ReleaseEntry)
            and e.run_id == RUN
            and e.quantity in ("patients", "train_loss")
        ]
        assert training == []
    updates = [e for e in _events(made) if e["event"] == "site_update"]
    assert all(e["patients"] == 0 and e["loss"] is None for e in updates)
    summary = json.loads((result.directory / "summary.json").read_text(encoding="utf-8"))
    assert summary["secure_aggregation"] is True
    assert summary["distributed_noise"] == {"sites": 3, "count_share": 0.25}
    audit = verify_workspace(workspace=made.workspace.root, run_name=RUN)
    assert audit.passed, [f.one_line() for f in audit.findings]
    (mode,) = audit.run_modes
    assert (mode.secure_aggregation, mode.distributed_sites) == (True, 3)
    html = build_report(workspace=made.workspace.root, run_name=RUN).to_html()
    assert (
        "distributed over 3 sites&#x27; shares" in html
        or "distributed over 3 sites' shares" in html
    )
    for site in made.site_configs:
        budget = summary["budgets"]["sites"][site]
        assert budget["budget_view"] == "distributed"
        assert budget["epsilon_spent"] == budget["epsilon_distributed"] < budget["epsilon_local"]
        checked = audit.site(site).distributed
        assert checked is not None
        assert checked.distributed == pytest.approx(budget["epsilon_distributed"])
        assert checked.local == pytest.approx(budget["epsilon_local"])


def test_a_round_with_fewer_shares_than_the_run_counts_on_is_abandoned(tmp_path: Path) -> None:
    made = _sites(tmp_path / "fed")
    settings = _settings(made, rounds=1, min_sites=3, round_timeout_s=5.0, wait_for_sites_s=1.0)
    nodes = in_process_nodes(workspace=made.workspace, site_configs=made.site_configs)
    grid = SilentGrid(
        nodes=nodes,
        client_app=medfed_client_app,
        silent={n.node_id for n in nodes if n.site_id == "site-c"},
        kind=TRAIN,
    )
    with _task_identity(run_id=grid.run.run_id):
        result = run_federation(grid=grid, settings=settings, workspace=made.workspace)

    assert result.rounds_completed == 0
    (abandoned,) = [e for e in _events(made) if e["event"] == "secure_round_abandoned"]
    assert "2 of 3 sites sent a masked update" in abandoned["reason"]
    assert "counts on 3 sites' shares" in abandoned["reason"]
    assert not (made.workspace.root / "runs" / RUN / "global" / "round-0001").exists()


def test_a_site_whose_policy_does_not_allow_it_declines_before_any_key(tmp_path: Path) -> None:
    made = make_synthetic_sites(
        root=tmp_path / "fed",
        sites=3,
        cases=12,
        size=32,
        training={"optimizer": "sgd"},
        full_batch=True,
    )
    result = run_in_process(
        workspace=made.workspace,
        site_configs=made.site_configs,
        settings=_settings(made, rounds=1, wait_for_sites_s=1.0),
    )
    assert result.rounds_completed == 0
    text = json.dumps(_events(made))
    assert "policy.distributed_noise.allowed is false" in text
    for site in made.site_configs:
        report = ledger_of(load_site_config(made.site_configs[site])).verify()
        assert not [e for e in report.entries if getattr(e, "run_id", None) == RUN]


def test_a_resumed_run_continues_the_mean_of_its_noisy_counts(tmp_path: Path) -> None:
    """The step divides by the mean of the rounds' noisy counts; the round records carry them,
    so an aggregator restarted after round 1 divides round 2's step by the mean of both."""
    made = _sites(tmp_path / "fed")

    with pytest.raises(Stopped):
        run_in_process(
            workspace=made.workspace,
            site_configs=made.site_configs,
            settings=_settings(made),
            on_event=stop_after_round(1),
        )
    resumed = run_in_process(
        workspace=made.workspace,
        site_configs=made.site_configs,
        settings=_settings(made, resume=True),
    )

    assert resumed.status == "finished" and resumed.rounds_completed == 2, resumed.reason
    global_dir = made.workspace.root / "runs" / RUN / "global"
    first = read_model(global_dir / "round-0001").metadata["distributed_counts"]
    second = read_model(global_dir / "round-0002").metadata["distributed_counts"]
    assert len(first) == 1 and len(second) == 2 and second[0] == first[0]
    # noisy sums over the three sites' 10 training patients each (noise std 8 patients)
    assert all(abs(count - 30) < 60 for count in second)
