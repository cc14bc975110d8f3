"""A federation of many virtual sites on Flower's simulation engine (Ray).

The aggregator is the deployment's round loop (:func:`medfed.aggregator.federation.run_federation`
over a Flower grid, as the ServerApp and the in-process grid run it) and every virtual site runs
medfed's ClientApp (:mod:`medfed.site.clientapp`): real synthetic data, DP-SGD with Opacus, a
signed privacy ledger per site, the aggregator's verified copy of each ledger and the budgets it
recomputes from them. What differs from a deployment is only where the sites run (Ray workers,
one virtual site at a time per CPU) and how MLflow is fed (:mod:`.simulation_tracking`).

Ray and ``flwr.simulation`` are imported only when a simulation runs: without the
``simulation`` extra the rest of medfed works, and this raises a
:class:`~medfed.errors.TransportError` that says what to install.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from medfed.config.run import RunSettings
from medfed.config.site import ModelSection
from medfed.run_events import EventCallback, RoundDone, RunEvent
from medfed.transport.simulation_memory import PeakMemory
from medfed.transport.simulation_sites import SITE_DELTA, VirtualSites

if TYPE_CHECKING:
    from medfed.aggregator.outcome import FederationResult

# A tiny 2-D UNet: the simulation measures the federation, not the network.
TINY_MODEL: Final = ModelSection(channels=[4, 8], strides=[2], num_res_units=1)
# Epsilon each simulated run plans to spend at every site (the sites' cap is 8): a handful of
# runs fit on the same virtual sites.
RUN_EPSILON: Final = 1.0
LEARNING_RATE: Final = 1e-2
RAY_ADDRESS_ENV: Final = "RAY_ADDRESS"
_ENGINE_ENV: Final = {
    # No telemetry or usage reports leave this machine.
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's notice about GPU variables on CPU-only workers, printed on every start.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray runs its workers at nice 15; a virtual site gets a CPU as a real site's node would,
    # instead of whatever other work on the host leaves over.
    "RAY_worker_niceness": "0",
}


@dataclass(frozen=True)
class SimulationRun:
    """What a simulation did, and what it took."""

    result: FederationResult
    sites: int
    rounds: int
    round_seconds: tuple[float, ...]
    wall_seconds: float
    peak_rss_mib: float
    peak_pss_mib: float
    rounds_peak_rss_mib: float  # up to the last round's end: before the run's report is written
    tracking_seconds: float

    @property
    def seconds_per_round(self) -> float:
        return sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else math.nan


def simulation_settings(
    *, sites: VirtualSites, rounds: int, run_name: str, local_epochs: int = 1
) -> RunSettings:
    """The run: every virtual site, a tiny UNet, noise planned to spend ``RUN_EPSILON``.

    Rounds wait long enough for every site to take its turn on the CPUs: one Ray worker trains
    one site at a time.
    """
    from medfed.privacy.accounting import noise_for_target_epsilon
    from medfed.privacy.sampling import plan_sampling

    count = len(sites.configs)
    # Each site trains full batch (simulation_sites): the sampling rate is 1.
    patients = sites.train_patients
    plan = plan_sampling(dataset_size=patients, batch_size=patients, epochs=local_epochs)
    noise = noise_for_target_epsilon(
        target_epsilon=RUN_EPSILON,
        sample_rate=plan.sample_rate,
        steps=plan.steps * rounds,
        delta=SITE_DELTA,
        accountant="rdp",
    )
    return RunSettings(
        run_name=run_name,
        rounds=rounds,
        local_epochs=local_epochs,
        learning_rate=LEARNING_RATE,
        model=TINY_MODEL,
        noise_multiplier=math.ceil(noise * 100) / 100,
        min_sites=max(1, count // 2),
        sites=list(sites.site_ids),
        wait_for_sites_s=5.0,
        round_timeout_s=600.0 + 10.0 * count,
    )


def run_simulation(
    *,
    sites: VirtualSites,
    settings: RunSettings,
    ray_address: str | None = None,
    cpus: int | None = None,
    tracking_uri: str | None = None,
    child_runs: int | None = None,
    on_event: EventCallback | None = None,
    memory: PeakMemory | None = None,
) -> SimulationRun:
    """Run ``settings`` over ``sites`` on Flower's simulation engine; what it did and took.

    ``ray_address`` joins a Ray cluster (``auto``: this host's; default ``RAY_ADDRESS``),
    otherwise Ray starts here with ``cpus`` CPUs. ``tracking_uri``: the MLflow store (None: not
    tracked); ``child_runs``: how many sites get an MLflow child run of their own
    (:mod:`.simulation_tracking`).
    """
    from medfed.aggregator.federation import run_federation
    from medfed.transport.inprocess import _task_identity
    from medfed.transport.simulation_client import VirtualSiteApp
    from medfed.transport.simulation_engine import (
        SimulationEngine,
        backend_config,
        require_engine,
    )
    from medfed.transport.simulation_tracking import simulation_tracking

    require_engine()
    for name, value in _ENGINE_ENV.items():
        os.environ.setdefault(name, value)
    address = ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
    workspace = sites.workspace
    rounds: list[float] = []
    rounds_peak = 0.0
    memory = PeakMemory() if memory is None else memory

    def record(event: RunEvent) -> None:
        nonlocal rounds_peak
        if isinstance(event, RoundDone) and event.seconds is not None:
            rounds.append(float(event.seconds))
            rounds_peak = memory.sampled_mib
        if on_event is not None:
            on_event(event)

    started = time.monotonic()
    with memory:
        engine = SimulationEngine(
            workspace=workspace,
            sites=dict(enumerate(sites.site_ids)),
            client_app=VirtualSiteApp(mapping_file=sites.mapping_file),
            config=backend_config(ray_address=address, cpus=cpus),
        )
        with (
            engine,
            _task_identity(run_id=engine.run.run_id),
            simulation_tracking(
                tracking_uri=tracking_uri,
                run_dir=workspace.layout.run(settings.run_name).directory,
                sites=len(sites.configs),
                child_runs=child_runs,
                on_event=record,
            ) as tracked,
        ):
            result = run_federation(
                grid=engine.grid, settings=settings, workspace=workspace, on_event=tracked.on_event
            )
    return SimulationRun(
        result=result,
        sites=len(sites.configs),
        rounds=settings.rounds,
        round_seconds=tuple(rounds),
        wall_seconds=time.monotonic() - started,
        peak_rss_mib=memory.peak_mib,
        peak_pss_mib=memory.pss_mib,
        rounds_peak_rss_mib=rounds_peak,
        tracking_seconds=tracked.seconds,
    )


def json_report(run: SimulationRun, *, verified: int) -> dict[str, Any]:
    """What ``medfed simulate --json`` writes."""
    return {
        "sites": run.sites,
        "rounds": run.rounds,
        "seconds_per_round": round(run.seconds_per_round, 3),
        "peak_rss_mib": round(run.peak_rss_mib, 1),
        "peak_pss_mib": round(run.peak_pss_mib, 1),
        "rounds_peak_rss_mib": round(run.rounds_peak_rss_mib, 1),
        "round_seconds": [round(s, 3) for s in run.round_seconds],
        "sites_verified": verified,
        "status": run.result.status,
        "rounds_completed": run.result.rounds_completed,
        "wall_seconds": round(run.wall_seconds, 1),
        "tracking_seconds": round(run.tracking_seconds, 2),
        "workspace": str(Path(run.result.directory).parent.parent),
    }
