"""`medfed site start` as a service: SIGTERM during a round, then a restart and a resumed run.

The real deployment on loopback (TLS, node authentication, the app guard): one site runs as
`medfed site start` in its own process, as systemd would run it, and is stopped with SIGTERM
while it trains. Everything started here is stopped here, also when an assertion fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfed.api.demo import DemoSetup, prepare_federation
from medfed.config import dump_site_config, load_site_config
from medfed.models.checkpoint import read_weights
from medfed.privacy import SiteLedger
from medfed.site.node_status import read_status
from medfed.transport.deploy import start_supernode
from medfed.transport.flwr_cli import wait_for_nodes, wait_for_run
from medfed.transport.processes import ProcessGroup, descendant_groups, free_port, group_alive
from medfed.transport.runner import follow, start_aggregator, submit

pytestmark = pytest.mark.slow

SERVICE_SITE = "site-b"


@contextlib.contextmanager
def site_service(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`medfed site start` in a session of its own; killed with all it started if left."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from medfed.cli.app import main; main()",
                "site",
                "start",
                "--config",
                str(config),
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        groups = {process.pid} | descendant_groups(process.pid)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=30)


def _ledger(setup: DemoSetup, site: str) -> SiteLedger:
    config = load_site_config(setup.site_configs[site])
    return SiteLedger(
        path=config.ledger_path, key_path=config.signing_key_path, site_id=config.site_id
    )


def _wait_for_reservation(ledger: Path, round_index: int, timeout_s: float) -> None:
    """Until the site has reserved the round's steps: training starts right after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in ledger.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                if entry.get("kind") == "reserve" and entry.get("round") == round_index:
                    return
        time.sleep(0.05)
    pytest.fail(f"no reservation for round {round_index} within {timeout_s} s")


def _events(setup: DemoSetup, run_id: int) -> list[dict[str, Any]]:
    """The run's events, each as its line in the events file."""
    followed = follow(
        workspace=setup.workspace,
        run_name=setup.settings.run_name,
        run_id=run_id,
        timeout_s=240,
    )
    return [event.to_json() for event in followed]


def test_sigterm_mid_round_keeps_the_ledger_whole_and_a_restarted_node_resumes_the_run(
    tmp_path: Path,
) -> None:
    setup = prepare_federation(
        root=tmp_path / "fed",
        port=free_port(),
        sites=2,
        cases=16,
        size=32,
        rounds=1,
        local_epochs=3,
    )
    # Both sites are needed: the round without site-b stops the run, which is then resumed.
    settings = setup.settings.model_copy(update={"min_sites": 2, "round_timeout_s": 60.0})
    # A SIGTERM that lands before the ClientApp's first step leaves the aborted round's
    # reservation open, counted in full; site-b's cap leaves room for the replay beside it.
    config = load_site_config(setup.site_configs[SERVICE_SITE])
    privacy = config.privacy.model_copy(update={"epsilon_cap": 2 * config.privacy.epsilon_cap})
    dump_site_config(
        config.model_copy(update={"privacy": privacy}), setup.site_configs[SERVICE_SITE]
    )
    config = load_site_config(setup.site_configs[SERVICE_SITE])
    logs = tmp_path / "logs"
    logs.mkdir()
    home = setup.workspace.layout.flwr_home
    with ProcessGroup() as group:
        group.add(start_aggregator(workspace=setup.workspace).process)
        group.add(
            start_supernode(
                config_path=setup.site_configs["site-a"],
                site=load_site_config(setup.site_configs["site-a"]),
                log_file=logs / "site-a.log",
            )
        )
        with site_service(setup.site_configs[SERVICE_SITE], logs / "service-1.log") as service:
            wait_for_nodes(flwr_home=home, count=2, timeout_s=120)
            run_id = submit(workspace=setup.workspace, settings=settings)
            _wait_for_reservation(config.ledger_path, 1, timeout_s=120)
            service.send_signal(signal.SIGTERM)
            code = service.wait(timeout=60)
            groups = descendant_groups(service.pid)
        assert code == 0, (logs / "service-1.log").read_text()[-3000:]
        assert not groups and not group_alive(service.pid)

        # The round was aborted, not torn: the ledger verifies, and either the steps taken are
        # committed or (SIGTERM caught the ClientApp before it could commit) the reservation
        # stays open and counts in full.
        report = _ledger(setup, SERVICE_SITE).verify()
        (aborted,) = report.reservations
        assert aborted.round == 1
        if aborted.committed:
            assert aborted.committed_steps is not None
            assert aborted.committed_steps < aborted.reserved_steps
        stopped = read_status(config=config)
        assert not stopped.online and stopped.offline_reason == "stopped: SIGTERM"
        first = _events(setup, run_id)
        assert first[-1]["event"] == "run_stopped", first[-1]
        wait_for_run(flwr_home=home, run_id=run_id, timeout_s=120)

        with site_service(setup.site_configs[SERVICE_SITE], logs / "service-2.log") as service:
            wait_for_nodes(flwr_home=home, count=2, timeout_s=120)
            # Timed out on purpose above; here the restarted node's first ClientApp may start cold
            # beside its warm worker's imports, which a loaded machine makes slow.
            resumed = settings.model_copy(update={"resume": True, "round_timeout_s": 300.0})
            run_id = submit(workspace=setup.workspace, settings=resumed)
            events = _events(setup, run_id)
            wait_for_run(flwr_home=home, run_id=run_id, timeout_s=120)
            assert service.poll() is None  # still serving

    lines = (logs / "service-1.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"site_id": SERVICE_SITE, "level": "INFO"}.items() <= logged[0].items()
    assert logged[-1]["message"] == "stopping the site node"
    assert events[-1]["event"] == "run_finished", (
        events[-1],
        (logs / "service-2.log").read_text()[-3000:],
    )
    # The resumed run trains the round again: site-b for real, site-a from its stored reply.
    assert [e["round"] for e in events if e["event"] == "round_done"] == [1]
    report = _ledger(setup, SERVICE_SITE).verify()
    assert [r.round for r in report.reservations] == [1, 1] and report.reservations[1].committed
    assert report.reservations[1].committed_steps == report.reservations[1].reserved_steps
    assert len(_ledger(setup, "site-a").verify().reservations) == 1
    copy = setup.workspace.root / "ledgers" / f"{SERVICE_SITE}.ledger.jsonl"
    assert copy.read_bytes() == report.path.read_bytes()
    # The site's checkpoint of the run is whole (its weights match the manifest's hash).
    stored = read_weights(path=config.paths.workdir / "checkpoints" / settings.run_name)
    assert stored.metadata["round"] == 1
