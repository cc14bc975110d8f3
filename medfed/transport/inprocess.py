"""A whole federation in one process: a Flower ``Grid`` that calls the ClientApp directly.

Flower has no in-process simulation without Ray, so this small grid runs the real ServerApp
round loop (:func:`medfed.aggregator.federation.run_federation`) against the real ClientApp
(:data:`medfed.site.clientapp.app`) for tests and notebooks. Each message reaches a site as
its own copy, as over the network: Flower hands one record object to every node, and a site
changing it must not change what the others see.

Two Flower internals are touched: the message id the SuperLink would assign, and the
process-wide task identity that Flower's ``Message`` constructor reads (set only while the run
lasts). Flower is pinned, and the deployment tests keep the real path honest.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from medfed.config.run import RunSettings
from medfed.errors import ConfigError
from medfed.run_events import EventCallback
from medfed.workspace import Workspace

if TYPE_CHECKING:
    from medfed.aggregator.outcome import FederationResult

# flwr.common.constant: the SuperLink's node id, the source of every instruction message.
SUPERLINK_NODE_ID = 1
# Flower's error code for a ClientApp that raised (flwr.common.constant.ErrorCode).
CLIENT_APP_RAISED_EXCEPTION = 2
SITE_CONFIG_KEY = "site-config"

ClientAppCallable = Callable[[Message, Context], Message]


@dataclass(frozen=True)
class InProcessNode:
    node_id: int
    site_id: str
    public_key: bytes
    config_path: Path


class InProcessGrid(Grid):
    """Delivers each message to its site's ClientApp at once; replies wait to be pulled."""

    def __init__(
        self,
        *,
        nodes: Iterable[InProcessNode],
        client_app: ClientAppCallable,
        run_id: int = 1,
    ) -> None:
        self._nodes = {node.node_id: node for node in nodes}
        self._client_app = client_app
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._states: dict[int, RecordDict] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [
            NodeInfo(node_id=node.node_id, name=node.site_id, public_key=node.public_key)
            for node in self._nodes.values()
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for message in messages:
            node = self._nodes.get(message.metadata.dst_node_id)
            if node is None:
                raise ValueError(f"no node {message.metadata.dst_node_id} in this grid")
            message_id = uuid.uuid4().hex
            metadata = message.metadata
            metadata.__dict__["_message_id"] = message_id
            metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[message_id] = self._deliver(node, copy.deepcopy(message))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, node: InProcessNode, message: Message) -> Message:
        context = Context(
            run_id=self._run.run_id,
            node_id=node.node_id,
            node_config={SITE_CONFIG_KEY: str(node.config_path)},
            state=self._states.setdefault(node.node_id, RecordDict()),
            run_config={},
        )
        try:
            return self._client_app(message, context)
        except Exception as exc:  # the deployment turns a raising ClientApp into an error reply
            error = Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
            return Message(error, reply_to=message)


def in_process_nodes(
    *, workspace: Workspace, site_configs: Mapping[str, Path]
) -> list[InProcessNode]:
    """One node per site, identified by the node key provisioned for it, as Flower would."""
    nodes = []
    for index, (site_id, path) in enumerate(sorted(site_configs.items()), start=1):
        workspace.site(site_id)  # an unknown site is a ConfigError naming the known ones
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no site configuration for site {site_id!r}")
        nodes.append(
            InProcessNode(
                node_id=1000 + index,
                site_id=site_id,
                public_key=workspace.node_public_key_pem(site_id),
                config_path=Path(path).absolute(),
            )
        )
    return nodes


def run_in_process(
    *,
    workspace: Workspace,
    site_configs: Mapping[str, Path],
    settings: RunSettings,
    on_event: EventCallback | None = None,
    client_app: ClientAppCallable | None = None,
    tracking_uri: str | None = None,
) -> FederationResult:
    """Run a federation with every site in this process, through the real round loop.

    ``client_app`` replaces medfed's ClientApp (tests use it to tamper with replies).
    ``tracking_uri``: log the run to this MLflow store, as the deployed ServerApp does (None:
    not tracked); every MLflow run is ended before this returns.
    """
    from medfed.aggregator.federation import run_federation
    from medfed.site.clientapp import app
    from medfed.tracking.tracker import tracking

    grid = InProcessGrid(
        nodes=in_process_nodes(workspace=workspace, site_configs=site_configs),
        client_app=client_app or app,
    )
    quick = settings.model_copy(update={"wait_for_sites_s": min(settings.wait_for_sites_s, 1.0)})
    if tracking_uri is not None:
        from medfed.tracking.uri import prepare_store

        prepare_store(uri=tracking_uri)
    with (
        _task_identity(run_id=grid.run.run_id),
        tracking(
            tracking_uri=tracking_uri,
            run_dir=workspace.layout.run(settings.run_name).directory,
            on_event=on_event,
        ) as tracked,
    ):
        return run_federation(grid=grid, settings=quick, workspace=workspace, on_event=tracked)


@contextlib.contextmanager
def _task_identity(*, run_id: int) -> Iterator[None]:
    """Act as the ServerApp's task for the run (Flower's Message reads this identity)."""
    names = ("_run_id", "_node_id", "_task_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 0
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(TaskIdentity, name, value)
