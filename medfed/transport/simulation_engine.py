"""Flower's simulation engine (Ray) with virtual nodes that carry the sites' provisioned keys.

Flower's own entry point (``flwr.simulation.run_simulation``) registers each virtual node with a
random public key, and the aggregator knows sites only by the node key Flower authenticated
(:mod:`medfed.aggregator.selection`). So the engine is started here the way Flower starts it,
with one difference: each virtual node is registered with the node key provisioned for its site
(the bytes ``flwr supernode register`` would store), as :mod:`medfed.transport.inprocess` does
for its grid. The aggregator's path from node key to site stays the deployment's, unchanged;
only the ClientApp needs its site's configuration, which
:class:`~medfed.transport.simulation_client.VirtualSiteApp` adds from the node's partition id.

This touches Flower internals (the in-memory link state, the Fleet simulation API): Flower is
pinned, :func:`require_engine` checks at start that they are there, and a failed engine ends
the run with a :class:`~medfed.errors.TransportError` instead of leaving it waiting.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from flwr.app import Message
from flwr.clientapp import ClientApp

from medfed.errors import TransportError
from medfed.workspace import Workspace

log = logging.getLogger("medfed.simulation")

INSTALL_HINT: Final = "install medfed[simulation] (pip install 'medfed[simulation]')"
# What start_vce, the link state and the in-memory grid need, as flwr 1.41 names them.
_FLOWER_NAMES: Final = {
    "flwr.server.superlink.fleet.vce": ("start_vce",),
    "flwr.server.superlink.fleet.vce.metrics": ("VceMetrics",),
    "flwr.server.superlink.linkstate": ("LinkStateFactory",),
    "flwr.server.superlink.linkstate.in_memory_linkstate": ("RunRecord",),
    "flwr.superlink.grid": ("InMemoryGrid",),
    "flwr.superlink.federation": ("NoOpFederationManager",),
    "flwr.supercore.object_store": ("ObjectStoreFactory",),
    "flwr.supercore.run": ("Run",),
    "flwr.proto.task_pb2": ("Task",),
    "flwr.common.constant": (
        "HEARTBEAT_INTERVAL_INF",
        "NOOP_ACCOUNT_NAME",
        "NOOP_FLWR_AID",
        "RUN_ID_NUM_BYTES",
        "TASK_ID_NUM_BYTES",
    ),
    "flwr.supercore.constant": ("FLWR_IN_MEMORY_DB_NAME", "NOOP_FEDERATION_ID"),
}
# Messages stored in the engine at a time, per CPU of the Ray cluster (see SimulationGrid).
IN_FLIGHT_PER_CPU: Final = 4
# Ray's own memory for objects in flight (messages, contexts): tiny models need little.
OBJECT_STORE_BYTES: Final = 256 * 1024 * 1024


def require_engine() -> None:
    """Raise :class:`TransportError` unless Ray and the Flower internals used here are there."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise TransportError(
            "Flower's simulation engine needs Ray, which is not installed", hint=INSTALL_HINT
        ) from None
    missing = []
    for module_name, names in _FLOWER_NAMES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]
    if missing:
        raise TransportError(
            f"this Flower lacks what the simulation uses: {', '.join(missing)}",
            hint="install the Flower version medfed pins (pip install 'medfed[simulation]')",
        )


def backend_config(*, ray_address: str | None, cpus: int | None) -> dict[str, Any]:
    """Flower's Ray backend settings: one CPU per virtual site at a time, quiet Ray logs.

    With ``ray_address`` the engine joins that cluster (``auto``: the one this host is part
    of) and uses its CPUs; otherwise it starts Ray on this host with ``cpus`` CPUs (all).
    """
    init: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if ray_address:
        init["address"] = ray_address
    else:
        init["object_store_memory"] = OBJECT_STORE_BYTES
        if cpus is not None:
            init["num_cpus"] = cpus
    return {
        "init_args": init,
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "actor": {"tensorflow": 0},
    }


@dataclass
class _Health:
    """What the engine's thread left behind when it stopped early."""

    error: BaseException | None = None
    stopped: threading.Event = field(default_factory=threading.Event)


def _grid_class() -> type[Any]:
    from flwr.superlink.grid import InMemoryGrid

    class SimulationGrid(InMemoryGrid):
        """Flower's in-memory grid, with fewer messages waiting in the engine at a time.

        The engine looks for each node's next message by scanning every stored message, once
        per node, ten times a second: a round's thousand messages for a thousand nodes cost a
        CPU core. So messages are stored a few per CPU at a time and the rest are held here,
        with their ids already given out; each pull stores more as replies come back. A
        pull that finds nothing after the engine stopped fails the run.
        """

        def __init__(self, *, state_factory: Any, health: _Health) -> None:
            super().__init__(state_factory=state_factory)
            self.health = health
            self._held: deque[Message] = deque()
            self._in_flight: set[str] = set()
            self._cpus: int | None = None

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            ids = []
            for message in messages:
                # What InMemoryGrid.push_messages does before storing a message.
                message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                self._check_message(message)
                self._held.append(message)
                ids.append(message.metadata.message_id)
            self._release()
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            wanted = set(message_ids)
            # Only stored messages: the link state answers an id it does not hold with an
            # error reply.
            replies = list(super().pull_messages(wanted & self._in_flight))
            wanted -= {reply.metadata.reply_to_message_id for reply in replies}
            # Replied to, or of an earlier stage nobody waits for any more (a timed-out round).
            self._in_flight &= wanted
            self._held = deque(m for m in self._held if m.metadata.message_id in wanted)
            self._release()
            if not replies and self.health.stopped.is_set():
                error = self.health.error
                raise TransportError(
                    "Flower's simulation engine stopped"
                    + ("" if error is None else f": {type(error).__name__}: {error}"),
                    hint="see the log above; Ray needs free memory and a writable /tmp",
                )
            return replies

        def _release(self) -> None:
            window = IN_FLIGHT_PER_CPU * self._cluster_cpus()
            while self._held and len(self._in_flight) < window:
                message = self._held.popleft()
                if self.state.store_message_ins(message):
                    self._in_flight.add(message.metadata.message_id)
                else:
                    log.error(
                        "the engine refused a message to node %s", message.metadata.dst_node_id
                    )

        def _cluster_cpus(self) -> int:
            import ray

            if self._cpus is None and ray.is_initialized():
                resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
                self._cpus = max(1, int(resources.get("CPU", 1)))
            return self._cpus or os.cpu_count() or 1

    return SimulationGrid


class SimulationEngine:
    """Virtual nodes for ``sites`` and the Ray engine that runs their ClientApp; a grid to them.

    Use as a context manager: the engine runs in a thread until the block ends, then its Ray
    actors are stopped (and Ray itself, when the engine started it).
    """

    def __init__(
        self,
        *,
        workspace: Workspace,
        sites: Mapping[int, str],
        client_app: ClientApp,
        config: Mapping[str, Any],
    ) -> None:
        from flwr.common.constant import (
            HEARTBEAT_INTERVAL_INF,
            NOOP_ACCOUNT_NAME,
            NOOP_FLWR_AID,
            RUN_ID_NUM_BYTES,
            TASK_ID_NUM_BYTES,
        )
        from flwr.proto.task_pb2 import Task
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
        from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supercore.run import Run
        from flwr.superlink.federation import NoOpFederationManager

        self._state_factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        state = self._state_factory.state()
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
        state.task_store[run.primary_task_id] = Task(  # type: ignore[attr-defined]
            task_id=run.primary_task_id, run_id=run.run_id
        )
        self._nodes: dict[int, int] = {}
        for partition, site in sorted(sites.items()):
            node_id = state.create_node(
                NOOP_FLWR_AID,
                NOOP_ACCOUNT_NAME,
                workspace.node_public_key_pem(site),
                heartbeat_interval=HEARTBEAT_INTERVAL_INF,
            )
            state.acknowledge_node_heartbeat(
                node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF
            )
            self._nodes[node_id] = partition
        self.run = run
        self.health = _Health()
        self.grid = _grid_class()(state_factory=self._state_factory, health=self.health)
        self.grid.set_run(run)
        self._client_app = client_app
        self._config = json.dumps(dict(config))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    def __enter__(self) -> SimulationEngine:
        self._thread = threading.Thread(target=self._serve, name="flower-simulation", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120.0)
            if self._thread.is_alive():
                log.warning("Flower's simulation engine did not stop within 120 s")

    def _serve(self) -> None:
        from flwr.server.superlink.fleet import vce
        from flwr.server.superlink.fleet.vce.metrics import VceMetrics

        try:
            vce.start_vce(
                backend_name="ray",
                backend_config_json_stream=self._config,
                app_dir="",
                is_app=False,
                f_stop=self._stop,
                run=self.run,
                metrics=VceMetrics(),
                client_app=self._client_app,
                state_factory=self._state_factory,
                existing_nodes_mapping=self._nodes,
            )
        except BaseException as exc:  # reported to the round loop through the grid
            log.error("Flower's simulation engine stopped: %s: %s", type(exc).__name__, exc)
            self.health.error = exc
        finally:
            self.health.stopped.set()
