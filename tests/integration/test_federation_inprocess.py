"""The real ServerApp round loop and ClientApp in one process (the in-process Grid).

Real NIfTI files, real Opacus DP-SGD, real signed ledgers; only the network is left out (the
deployment tests cover it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from event_support import Stopped, stop_after_round
from flwr.app import Array, ArrayRecord, Context, Message

from medfed.api.demo import DemoSetup, prepare_federation
from medfed.config import load_site_config
from medfed.config.loading import dump_site_config
from medfed.privacy import DPSteps, SiteLedger, compute_epsilon, plan_sampling
from medfed.site.clientapp import app as medfed_client_app
from medfed.site.ledger_of import ledger_of
from medfed.transport.inprocess import run_in_process

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, **kwargs: Any) -> DemoSetup:
    options: dict[str, Any] = {"sites": 3, "cases": 16, "size": 32, "rounds": 2, "local_epochs": 2}
    options.update(kwargs)
    return prepare_federation(root=tmp_path / "fed", **options)


def _events(setup: DemoSetup) -> list[dict[str, Any]]:
    path = setup.workspace.root / "runs" / setup.settings.run_name / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ledger(setup: DemoSetup, site: str) -> SiteLedger:
    config = load_site_config(setup.site_configs[site])
    return SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )


def _set_cap(setup: DemoSetup, site: str, cap: float) -> None:
    path = setup.site_configs[site]
    config = load_site_config(path)
    privacy = config.privacy.model_copy(update={"epsilon_cap": cap})
    dump_site_config(config.model_copy(update={"privacy": privacy}), path)


def test_federation_learns_and_keeps_every_ledger_in_step(tmp_path: Path) -> None:
    setup = _setup(tmp_path, cases=24, local_epochs=3)
    result = run_in_process(
        workspace=setup.workspace, site_configs=setup.site_configs, settings=setup.settings
    )

    assert result.status == "finished", result.reason
    assert result.rounds_completed == 2
    assert result.dice_final > result.dice_initial + 0.05
    run_dir = setup.workspace.root / "runs" / "demo"
    for round_index in (0, 1, 2):
        assert (run_dir / "global" / f"round-{round_index:04d}" / "model.safetensors").is_file()
    audit = run_dir / "report" / "audit"
    assert (audit / "audit_report.pdf").read_bytes().startswith(b"%PDF")
    assert "site-a" in (audit / "audit_report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["site_id"] for s in summary["sites"]] == ["site-a", "site-b", "site-c"]
    for site in summary["sites"]:
        ledger = _ledger(setup, site["site_id"])
        spent = ledger.spent(delta=1e-5, accountant="rdp")
        # The aggregator's copy is the site's ledger byte for byte, and its epsilon is the same.
        copy = setup.workspace.root / "ledgers" / f"{site['site_id']}.ledger.jsonl"
        assert copy.read_bytes() == ledger.path.read_bytes()
        assert site["epsilon_spent"] == pytest.approx(spent, rel=1e-12)
        assert 0 < spent <= site["epsilon_cap"]
        assert site["rounds"] == 2 and site["status"] == "active"
        # every request brought the aggregator's signed receipt; the site kept the newest
        receipts = ledger_of(load_site_config(setup.site_configs[site["site_id"]])).receipts
        kept = None if receipts is None else receipts.load()
        assert kept is not None and 0 < kept.count <= len(ledger.verify().entries)
    kinds = [event["event"] for event in _events(setup)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("round_done") == 2


def _tampering(tamper: dict[str, str]) -> Any:
    """A ClientApp that corrupts the update of the sites named in ``tamper``."""

    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        site = load_site_config(Path(str(context.node_config["site-config"]))).site_id
        how = tamper.get(site)
        if how is None or message.metadata.message_type != "train" or reply.has_error():
            return reply
        update = reply.content["update"]
        assert isinstance(update, ArrayRecord)
        name = sorted(update)[0]
        values = update[name].numpy()
        if how == "nan":
            values = values.copy()
            values.flat[0] = np.nan
        else:
            values = np.zeros((*values.shape, 2), dtype=np.float32)
        update[name] = Array(values)
        return reply

    return client_app


def test_tampered_updates_are_rejected_and_named(tmp_path: Path) -> None:
    setup = _setup(tmp_path, rounds=1)
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings.model_copy(update={"min_sites": 1}),
        client_app=_tampering({"site-b": "nan", "site-c": "shape"}),
    )

    assert result.status == "finished"
    rejected = {
        e["site"]: " ".join(e["reasons"]) for e in _events(setup) if e["event"] == "site_rejected"
    }
    assert set(rejected) == {"site-b", "site-c"}
    assert "non-finite" in rejected["site-b"] or "NaN" in rejected["site-b"]
    assert "shape" in rejected["site-c"]
    done = next(e for e in _events(setup) if e["event"] == "round_done")
    assert done["sites_answered"] == 1
    statuses = {s["site_id"]: s["status"] for s in result.sites}
    assert statuses == {"site-a": "active", "site-b": "failed", "site-c": "failed"}


def test_sites_out_of_budget_decline_or_are_no_longer_asked(tmp_path: Path) -> None:
    setup = _setup(tmp_path, rounds=3, local_epochs=1)
    noise = setup.settings.noise_multiplier
    assert noise is not None
    plan = plan_sampling(dataset_size=setup.train_patients["site-b"], batch_size=4, epochs=1)

    def epsilon(rounds: int) -> float:
        steps = DPSteps(
            noise_multiplier=noise, sample_rate=plan.sample_rate, steps=rounds * plan.steps
        )
        return compute_epsilon(history=[steps], delta=1e-5, accountant="rdp")

    # site-b can afford exactly one round, site-c none.
    caps = {"site-a": 8.0, "site-b": (epsilon(1) + epsilon(2)) / 2, "site-c": epsilon(1) / 2}
    _set_cap(setup, "site-b", caps["site-b"])
    _set_cap(setup, "site-c", caps["site-c"])
    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings.model_copy(update={"min_sites": 1}),
    )

    assert result.status == "finished"
    events = _events(setup)
    declined = [e for e in events if e["event"] == "site_declined"]
    assert [(e["site"], e["round"], e["code"]) for e in declined] == [
        ("site-c", 1, "budget-exceeded")
    ]
    exhausted = [e for e in events if e["event"] == "site_exhausted"]
    assert [(e["site"]) for e in exhausted] == ["site-b"]
    asked = {e["round"]: e["sites"] for e in events if e["event"] == "round_started"}
    assert asked == {1: ["site-a", "site-b", "site-c"], 2: ["site-a"], 3: ["site-a"]}
    for site, cap in caps.items():
        spent = _ledger(setup, site).spent(delta=1e-5, accountant="rdp")
        assert spent <= cap
    # site-c released its (public) counts when it was set up, and reserved nothing since.
    assert _ledger(setup, "site-c").verify().reservations == ()


def test_a_run_that_breaks_site_policy_is_declined_before_any_data_is_read(
    tmp_path: Path,
) -> None:
    setup = _setup(tmp_path, sites=2, rounds=1)
    path = setup.site_configs["site-b"]
    config = load_site_config(path)
    policy = config.policy.model_copy(
        update={
            "max_local_epochs": 1,
            "max_rounds_per_run": 1,  # the run plans 1 round: allowed
            "max_parameters": 1000,
            "accepted_projects": ["cardio-*"],
        }
    )
    dump_site_config(config.model_copy(update={"policy": policy}), path)
    cache = config.cache_dir
    ledger = config.ledger_path.read_bytes()  # the counts the site released when set up

    result = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings.model_copy(update={"min_sites": 1}),
    )

    assert result.status == "finished"
    declined = [e for e in _events(setup) if e["event"] == "site_declined"]
    assert [e["site"] for e in declined] == ["site-b"]
    assert declined[0]["code"] == "policy"
    reason = declined[0]["reason"]
    assert "max_local_epochs" in reason and "max_parameters" in reason
    assert "accepted_projects" in reason and "max_rounds_per_run" not in reason
    assert config.ledger_path.read_bytes() == ledger
    assert not cache.exists() or not any(cache.rglob("*.npz"))
    assert not (config.paths.workdir / "federation").exists()  # no stored reply either


def test_resume_continues_from_the_last_round_without_spending_twice(tmp_path: Path) -> None:
    setup = _setup(tmp_path, sites=2, rounds=3, local_epochs=1)

    with pytest.raises(Stopped):
        run_in_process(
            workspace=setup.workspace,
            site_configs=setup.site_configs,
            settings=setup.settings,
            on_event=stop_after_round(1),
        )
    spent_after_one = {
        s: _ledger(setup, s).spent(delta=1e-5, accountant="rdp") for s in setup.site_configs
    }

    # Without resume the name is taken; with it the run goes on from round 1's model.
    with pytest.raises(Exception, match="already exists"):
        run_in_process(
            workspace=setup.workspace, site_configs=setup.site_configs, settings=setup.settings
        )
    resumed = run_in_process(
        workspace=setup.workspace,
        site_configs=setup.site_configs,
        settings=setup.settings.model_copy(update={"resume": True}),
    )

    assert resumed.status == "finished" and resumed.rounds_completed == 3, resumed.reason
    started = [e for e in _events(setup) if e["event"] == "round_started"]
    assert [e["round"] for e in started] == [1, 2, 3]
    for site in setup.site_configs:
        report = _ledger(setup, site).verify()
        rounds = [r.round for r in report.reservations]
        assert rounds == [1, 2, 3], rounds  # no gap, no round spent twice
        assert all(r.committed for r in report.reservations)
        assert _ledger(setup, site).spent(delta=1e-5, accountant="rdp") > spent_after_one[site]
        copy = setup.workspace.root / "ledgers" / f"{site}.ledger.jsonl"
        assert copy.read_bytes() == report.path.read_bytes()
    assert math.isfinite(resumed.dice_final)


def test_a_site_that_raises_its_cap_is_flagged_by_the_aggregator(tmp_path: Path) -> None:
    setup = _setup(tmp_path, sites=2, rounds=1, local_epochs=1)
    first = run_in_process(
        workspace=setup.workspace, site_configs=setup.site_configs, settings=setup.settings
    )
    assert first.status == "finished"
    _set_cap(setup, "site-b", 12.0)
    # site-a has spent its cap: the second run goes on with site-b alone.
    again = setup.settings.model_copy(update={"run_name": "second", "min_sites": 1})
    second = run_in_process(
        workspace=setup.workspace, site_configs=setup.site_configs, settings=again
    )
    assert second.status == "finished"
    path = setup.workspace.root / "runs" / "second" / "events.jsonl"
    alerts = [
        json.loads(line)
        for line in path.read_text().splitlines()
        if json.loads(line)["event"] == "privacy_alert"
    ]
    assert [a["site"] for a in alerts] == ["site-b"]
    assert "site site-b raised its cap" in alerts[0]["alert"]
    update = next(
        json.loads(line)
        for line in path.read_text().splitlines()
        if json.loads(line)["event"] == "site_update" and json.loads(line)["site"] == "site-b"
    )
    assert update["epsilon_cap"] == 12.0  # the ledger's terms, signed by the site
