"""A complete synthetic federation on this machine: workspace, non-IID sites, run settings.

Used by `medfed demo`, by the in-process runner in notebooks and by the tests. Each site gets
its own synthetic patients (a different intensity shift per site, so the data is non-IID), a
configuration that uses its provisioning kit (TLS CA, node key, ledger key), and the run's
noise multiplier is planned so that the whole run spends 90% of the sites' cap.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.config.run import RunSettings
from medfed.errors import ConfigError, TransportError
from medfed.transport.provision import SUPERLINK_PORT, Workspace

if TYPE_CHECKING:
    from medfed.transport.processes import ManagedProcess, ProcessGroup

DEMO_CAP = 8.0
DEMO_DELTA = 1e-5
BATCH_SIZE = 4
# Share of the cap one planned run may spend: a re-run or a retried round still fits.
PLANNED_SHARE = 0.9

log = logging.getLogger("medfed.demo")


@dataclass(frozen=True)
class DemoSetup:
    """Everything a synthetic federation needs, on disk."""

    root: Path
    workspace: Workspace
    site_configs: dict[str, Path]
    settings: RunSettings
    train_patients: dict[str, int]


def site_names(count: int) -> list[str]:
    if count < 1 or count > 26:
        raise ConfigError(f"--sites must be between 1 and 26, not {count}")
    return [f"site-{chr(ord('a') + index)}" for index in range(count)]


def planned_noise(
    *, train_patients: Sequence[int], epochs: int, cap: float = DEMO_CAP, delta: float = DEMO_DELTA
) -> float:
    """Noise with which ``epochs`` epochs at every site spend at most 90% of ``cap``.

    The smallest site has the highest sampling rate and so the highest epsilon; planning for
    it keeps every site within the cap. Rounded up to 0.01 (more noise, less epsilon).
    """
    from medfed.privacy import noise_for_target_epsilon, plan_sampling

    plan = plan_sampling(dataset_size=min(train_patients), batch_size=BATCH_SIZE, epochs=epochs)
    noise = noise_for_target_epsilon(
        target_epsilon=PLANNED_SHARE * cap,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=delta,
        accountant="rdp",
    )
    return math.ceil(noise * 100) / 100


def remove_demo(root: Path) -> None:
    """Delete an earlier demo directory, and nothing that does not look like one."""
    import shutil

    root = Path(root)
    if not root.exists():
        return
    if not (root / "workspace" / "workspace.yaml").is_file() or not (root / "sites").is_dir():
        raise ConfigError(
            f"{root} is not a medfed demo directory; refusing to delete it",
            hint="choose another --workspace",
        )
    shutil.rmtree(root)


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
    from medfed.config.loading import dump_site_config, load_site_config
    from medfed.config.site import TransportSection
    from medfed.data.synth import synthesize_site
    from medfed.transport.provision import provision_workspace

    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"{root} is not empty", hint="choose a new --workspace directory, or delete this one"
        )
    names = site_names(sites)
    workspace = provision_workspace(
        out=root / "workspace", sites=names, host="127.0.0.1", port=port or SUPERLINK_PORT
    )
    configs: dict[str, Path] = {}
    train_patients: dict[str, int] = {}
    for index, name in enumerate(names):
        site_dir = root / "sites" / name
        # Spread the sites' intensity shifts over [-0.5, 0.5]: non-IID but learnable together.
        shift = 0.0 if sites == 1 else -0.5 + index / (sites - 1)
        result = synthesize_site(
            out=site_dir / "data",
            cases=cases,
            size=size,
            seed=seed + 101 * index,
            site_shift=shift,
            site_id=name,
        )
        base = load_site_config(result.config)
        kit = workspace.root / workspace.site(name).kit
        data = base.model_dump()
        data["paths"]["workdir"] = site_dir / "work"
        data["paths"]["signing_key"] = kit / "ledger_key.pem"
        # Sites share this machine's cores: one thread each, fewer when they outnumber the cores.
        data["training"]["threads"] = max(1, (os.cpu_count() or 1) // sites)
        data["privacy"]["epsilon_cap"] = DEMO_CAP
        data["privacy"]["delta"] = DEMO_DELTA
        data["transport"] = TransportSection(
            superlink_address=workspace.manifest.address,
            root_certificates=kit / "ca.crt",
            node_private_key=kit / "node_key",
            node_public_key=kit / "node_key.pub",
        ).model_dump()
        config = type(base).model_validate(data)
        path = site_dir / "site.yaml"
        dump_site_config(config, path)
        configs[name] = path
        train_patients[name] = result.n_train
    noise = planned_noise(
        train_patients=list(train_patients.values()), epochs=rounds * local_epochs
    )
    settings = RunSettings(
        run_name=run_name,
        rounds=rounds,
        local_epochs=local_epochs,
        noise_multiplier=noise,
        min_sites=min(sites, 2) if min_sites is None else min_sites,
        sites=names,
        seed=seed,
    )
    return DemoSetup(
        root=root,
        workspace=workspace,
        site_configs=configs,
        settings=settings,
        train_patients=train_patients,
    )


def start_site_nodes(*, group: ProcessGroup, setup: DemoSetup) -> dict[str, ManagedProcess]:
    """One SuperNode per site, owned by ``group``; returns once all of them are online."""
    from medfed.config import load_site_config
    from medfed.transport.deploy import start_supernode
    from medfed.transport.flwr_cli import wait_for_nodes
    from medfed.transport.runner import flwr_home, logs_dir

    logs = logs_dir(setup.workspace)
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
        flwr_home=flwr_home(setup.workspace),
        count=len(nodes),
        timeout_s=120.0,
        watch=list(nodes.values()),
    )
    return nodes


def run_deployed(
    *,
    setup: DemoSetup,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 1800.0,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run ``setup`` on the real deployment: SuperLink and one SuperNode per site, as processes.

    TLS and node authentication are on; every process is stopped on return, on an error, on
    Ctrl-C and on SIGTERM. The run is logged to MLflow (``tracking_uri``, default the
    workspace's SQLite store; see :func:`medfed.transport.runner.start_aggregator`). Returns
    the run's summary.
    """
    from medfed.transport.flwr_cli import wait_for_run
    from medfed.transport.processes import ProcessGroup
    from medfed.transport.runner import flwr_home, follow, start_aggregator, submit

    workspace = setup.workspace
    with ProcessGroup(handle_signals=True) as group:
        aggregator = start_aggregator(workspace=workspace, tracking_uri=tracking_uri)
        group.add(aggregator.process)
        start_site_nodes(group=group, setup=setup)
        run_id = submit(workspace=workspace, settings=setup.settings)

        def alive() -> None:
            for process in group.processes:
                if not process.running():
                    raise TransportError(
                        f"{process.name} stopped unexpectedly",
                        hint=f"see {process.log_file}: {process.log_tail(3)}",
                    )

        last: dict[str, Any] = {}
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
            try:
                wait_for_run(flwr_home=flwr_home(workspace), run_id=run_id, timeout_s=180.0)
            except TransportError as exc:
                log.warning("the ServerApp did not end in time (%s); MLflow may be incomplete", exc)
    if last.get("event") == "run_failed":
        raise TransportError(f"the federation failed: {last.get('reason')}")
    summary = last.get("summary")
    if not isinstance(summary, dict):
        raise TransportError("the federation ended without a summary")
    return summary
