"""A complete synthetic federation on this machine: workspace, non-IID sites, run settings.

Used by `medfed demo`, the benchmarks and the tests. The sites come from
:func:`medfed.api.sites.make_synthetic_sites` (its own synthetic patients per site, with a
different intensity shift per site, so the data is non-IID, and a configuration that uses its
provisioning kit: TLS CA, node key, ledger key); the run's noise multiplier is planned so that
the whole run spends 90% of the sites' cap.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.config.run import RunSettings
from medfed.config.site import ModelSection
from medfed.errors import ConfigError, TransportError
from medfed.run_events import EventCallback, RunEnded, RunEvent, RunFailed
from medfed.workspace import Workspace

if TYPE_CHECKING:
    from medfed.api.sites import SyntheticSites
    from medfed.transport.processes import ManagedProcess, ProcessGroup

DEMO_CAP = 8.0
# Where the demo's SuperLink listens (the synthetic sites' workspace is provisioned for it).
DEMO_HOST = "127.0.0.1"
DEMO_DELTA = 1e-5
BATCH_SIZE = 4
# Share of the cap one planned run may spend: a re-run or a retried round still fits.
PLANNED_SHARE = 0.9
# A demo must show learning within its few rounds. Over two rounds of three local epochs the
# sites' defaults (Adam at 0.02, channels 8-16-32) gained under 0.05 Dice in 5 of 23 runs; these
# settings gained 0.10-0.29 in 14 of 14 (benchmarks/README.md, "Demo settings").
DEMO_LEARNING_RATE = 1e-2
DEMO_MODEL = ModelSection(channels=[8, 16], strides=[2])

log = logging.getLogger("medfed.demo")


@dataclass(frozen=True)
class DemoSetup:
    """Everything a synthetic federation needs, on disk."""

    root: Path
    workspace: Workspace
    site_configs: dict[str, Path]
    settings: RunSettings
    train_patients: dict[str, int]


def planned_noise(
    *, train_patients: Sequence[int], epochs: int, cap: float = DEMO_CAP, delta: float = DEMO_DELTA
) -> float:
    """Noise with which ``epochs`` epochs at every site spend at most 90% of ``cap``.

    The smallest site has the highest sampling rate and so the highest epsilon; planning for
    it keeps every site within the cap. Rounded up to 0.01 (more noise, less epsilon).
    """
    from medfed.api.planner import plan_noise

    noise = plan_noise(
        dataset_size=min(train_patients),
        batch_size=BATCH_SIZE,
        epochs_per_round=epochs,
        rounds=1,
        target_epsilon=PLANNED_SHARE * cap,
        delta=delta,
    )
    return math.ceil(noise * 100) / 100


def is_demo_directory(root: Path) -> bool:
    """Whether ``root`` looks like what :func:`prepare_federation` made."""
    return (root / "workspace" / "workspace.yaml").is_file() and (root / "sites").is_dir()


def remove_demo(root: Path) -> None:
    """Delete an earlier demo directory, and nothing that does not look like one."""
    import shutil

    root = Path(root)
    if not root.exists():
        return
    if not is_demo_directory(root):
        raise ConfigError(
            f"{root} is not a medfed demo directory; refusing to delete it",
            hint="choose another --workspace (--force replaces only an earlier demo)",
        )
    shutil.rmtree(root)


def claim_demo_directory(root: Path, *, force: bool) -> None:
    """Make sure a demo can be written to ``root``: new, empty, or (``force``) an earlier demo,
    which is deleted. Anything else is refused before anything is made."""
    root = Path(root)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    if force:
        remove_demo(root)
    elif is_demo_directory(root):
        raise ConfigError(
            f"{root} holds an earlier demo",
            hint="add --force to replace it, or choose another --workspace",
        )
    else:
        raise ConfigError(
            f"{root} is not empty and holds no medfed demo",
            hint="choose another --workspace (--force replaces only an earlier demo)",
        )


def check_demo_port(port: int) -> None:
    """Refuse a busy SuperLink port before the demo writes anything (its data takes a while)."""
    from medfed.transport.processes import check_port_free

    try:
        check_port_free(DEMO_HOST, port, what="the demo's SuperLink")
    except TransportError as exc:
        raise TransportError(
            exc.message, hint="choose another --port, or leave --port out for a free one"
        ) from None


def prepare_federation(
    *,
    root: Path,
    sites: int = 3,
    cases: int = 30,
    size: int = 32,
    rounds: int = 3,
    local_epochs: int = 5,
    seed: int = 0,
    port: int | None = None,
    run_name: str = "demo",
    min_sites: int | None = None,
) -> DemoSetup:
    """Provision a workspace under ``root`` and write one synthetic site per name."""
    from medfed.api.sites import make_synthetic_sites

    made = make_synthetic_sites(
        root=root,
        sites=sites,
        cases=cases,
        size=size,
        seed=seed,
        epsilon_cap=DEMO_CAP,
        delta=DEMO_DELTA,
        port=port,
    )
    noise = planned_noise(
        train_patients=list(made.train_patients.values()), epochs=rounds * local_epochs
    )
    settings = RunSettings(
        run_name=run_name,
        rounds=rounds,
        local_epochs=local_epochs,
        noise_multiplier=noise,
        learning_rate=DEMO_LEARNING_RATE,
        model=DEMO_MODEL,
        min_sites=min(sites, 2) if min_sites is None else min_sites,
        sites=made.sites,
        seed=seed,
    )
    return DemoSetup(
        root=made.root,
        workspace=made.workspace,
        site_configs=dict(made.site_configs),
        settings=settings,
        train_patients=dict(made.train_patients),
    )


def start_site_nodes(
    *, group: ProcessGroup, setup: DemoSetup | SyntheticSites
) -> dict[str, ManagedProcess]:
    """One SuperNode per site, owned by ``group``; returns once all of them are online."""
    from medfed.config import load_site_config
    from medfed.transport.deploy import start_supernode
    from medfed.transport.flwr_cli import wait_for_nodes

    logs = setup.workspace.layout.logs
    nodes = {
        site: group.add(
            start_supernode(
                config_path=path,
                site=load_site_config(path),
                log_file=logs / f"supernode-{site}.log",
            )
        )
        for site, path in sorted(setup.site_configs.items())
    }
    wait_for_nodes(
        flwr_home=setup.workspace.layout.flwr_home,
        count=len(nodes),
        timeout_s=120.0,
        watch=list(nodes.values()),
    )
    return nodes


def run_deployed(
    *,
    setup: DemoSetup,
    on_event: EventCallback | None = None,
    timeout_s: float = 1800.0,
    tracking_uri: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``setup`` on the real deployment: SuperLink and one SuperNode per site, as processes.

    TLS and node authentication are on; every process is stopped on return, on an error, on
    Ctrl-C and on SIGTERM. The run is logged to MLflow (``tracking_uri``, default the
    workspace's SQLite store; see :func:`medfed.transport.runner.start_aggregator`). Returns
    the run's summary. ``on_phase`` is told what is being done when no event says it (the
    processes starting, the aggregator's last MLflow uploads).
    """
    from medfed.transport.flwr_cli import wait_for_run
    from medfed.transport.processes import ProcessGroup
    from medfed.transport.runner import follow, start_aggregator, submit

    workspace = setup.workspace
    say = on_phase or (lambda text: None)
    with ProcessGroup(handle_signals=True) as group:
        say(f"starting the aggregator (Flower SuperLink) at {workspace.manifest.address}")
        # The SuperLink lives exactly as long as this federation: its state in memory, where
        # many sites' replies do not contend for one SQLite file's lock.
        aggregator = start_aggregator(
            workspace=workspace, tracking_uri=tracking_uri, state="memory"
        )
        group.add(aggregator.process)
        say(f"starting {len(setup.site_configs)} site nodes (Flower SuperNodes)")
        start_site_nodes(group=group, setup=setup)
        say("submitting the run")
        run_id = submit(workspace=workspace, settings=setup.settings)

        def alive() -> None:
            for process in group.processes:
                if not process.running():
                    raise TransportError(
                        f"{process.name} stopped unexpectedly",
                        hint=f"see {process.log_file}: {process.log_tail(3)}",
                    )

        last: RunEvent | None = None
        for event in follow(
            workspace=workspace,
            run_name=setup.settings.run_name,
            run_id=run_id,
            timeout_s=timeout_s,
            alive=alive,
        ):
            last = event
            if on_event is not None:
                on_event(event)
        if aggregator.tracking_uri is not None:
            # After its last event the ServerApp still logs artifacts and the model to MLflow
            # and ends the MLflow runs: let it return before the processes are stopped.
            say("the aggregator is logging the run's report and model to MLflow")
            try:
                wait_for_run(flwr_home=workspace.layout.flwr_home, run_id=run_id, timeout_s=180.0)
            except TransportError as exc:
                log.warning("the ServerApp did not end in time (%s); MLflow may be incomplete", exc)
    if isinstance(last, RunFailed):
        raise TransportError(f"the federation failed: {last.reason}")
    if not isinstance(last, RunEnded) or last.summary is None:
        raise TransportError("the federation ended without a summary")
    return dict(last.summary)
