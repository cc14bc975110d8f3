"""The aggregator's secure aggregation stages over the in-process grid, with sites that hold
no data: the settings it refuses, a key epoch, and a forged bundle named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message

from medfed.aggregator.budget import BudgetTracker
from medfed.aggregator.context import RunContext
from medfed.aggregator.outcome import SiteRecord
from medfed.aggregator.run_store import RunStore
from medfed.aggregator.secure_epoch import start_epoch
from medfed.aggregator.secure_round import check_settings
from medfed.config.loading import dump_site_config
from medfed.config.run import RunSettings
from medfed.config.site import SiteConfig
from medfed.envelope import SECAGG_KEYS
from medfed.errors import SecureAggregationError
from medfed.run_events import RunEvent, SecureEpochStarted
from medfed.site.clientapp import app as medfed_client_app
from medfed.transport.inprocess import InProcessGrid, _task_identity, in_process_nodes
from medfed.transport.provision import provision_workspace
from medfed.workspace import Workspace

SITES = ("site-a", "site-b", "site-c")


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_strategies_are_refused_with_secure_aggregation(name: str) -> None:
    settings = RunSettings(
        run_name="r", strategy={"name": name}, min_sites=3, secure_aggregation=True
    )
    with pytest.raises(SecureAggregationError, match=f"strategy '{name}' needs each site") as e:
        check_settings(settings)
    assert e.value.exit_code == 22
    check_settings(settings.model_copy(update={"secure_aggregation": False}))


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_weighted_means_are_accepted(name: str) -> None:
    check_settings(RunSettings(run_name="r", strategy={"name": name}, secure_aggregation=True))
    assert RunSettings(run_name="r").secure_aggregation is False


def _federation(tmp_path: Path) -> tuple[Workspace, dict[str, Path]]:
    workspace = provision_workspace(out=tmp_path / "ws", sites=list(SITES), host="127.0.0.1")
    configs = {}
    for site in SITES:
        config = SiteConfig.model_validate(
            {
                "site_id": site,
                "data": {"manifest": str(tmp_path / site / "missing.csv")},
                "paths": {
                    "workdir": str(tmp_path / site / "work"),
                    "signing_key": str(workspace.root / "sites" / site / "ledger_key.pem"),
                },
            }
        )
        configs[site] = tmp_path / f"{site}.yaml"
        dump_site_config(config, configs[site])
    return workspace, configs


def _start(tmp_path: Path, client_app: Any) -> tuple[SecureEpochStarted, Any]:
    workspace, configs = _federation(tmp_path)
    settings = RunSettings(run_name="study", secure_aggregation=True, round_timeout_s=5.0)
    store = RunStore(paths=workspace.layout.run(settings.run_name))
    store.start(settings)
    events: list[RunEvent] = []
    nodes = in_process_nodes(workspace=workspace, site_configs=configs)
    ctx = RunContext(
        grid=InProcessGrid(nodes=nodes, client_app=client_app),
        settings=settings,
        workspace=workspace,
        store=store,
        tracker=BudgetTracker(
            directory=workspace.layout.ledgers,
            public_keys={s: workspace.ledger_public_key(s) for s in SITES},
        ),
        on_event=events.append,
    )
    ctx.sites = {site: SiteRecord(site_id=site) for site in SITES}
    by_site = {node.site_id: node.node_id for node in nodes}
    with _task_identity(run_id=ctx.grid.run.run_id):
        epoch = start_epoch(ctx, by_site, epoch=1, rounds=(1, 2, 3))
    (started,) = [e for e in events if isinstance(e, SecureEpochStarted)]
    return started, epoch


def test_a_key_epoch_starts_with_every_site(tmp_path: Path) -> None:
    started, epoch = _start(tmp_path, medfed_client_app)
    assert epoch.members == SITES and epoch.roster.threshold == 2
    assert started.sites == SITES and started.excluded == {} and started.rounds == (1, 2, 3)
    assert epoch.point.max_sum_error < 1e-3 * 1.0  # far below the bound of one coordinate


def test_a_forged_bundle_is_excluded_and_named(tmp_path: Path) -> None:
    def client_app(message: Message, context: Context) -> Message:
        reply = medfed_client_app(message, context)
        if message.metadata.message_type == SECAGG_KEYS and "site-b" in str(
            context.node_config["site-config"]
        ):
            site = reply.content["site"]
            assert isinstance(site, ConfigRecord)
            payload = json.loads(str(site["secagg"]))
            payload["bundle"]["signature"] = ""
            site["secagg"] = json.dumps(payload)
        return reply

    started, epoch = _start(tmp_path, client_app)
    assert epoch.members == ("site-a", "site-c")
    assert started.excluded == {"site-b": "the key bundle has no signature"}
