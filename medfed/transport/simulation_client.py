"""The ClientApp a virtual site runs in Flower's simulation engine: medfed's own, given its site.

Flower's simulation engine gives each virtual node a node config with only its ``partition-id``;
a real node gets ``site-config`` from hospital IT (``--node-config``). :class:`VirtualSiteApp`
adds the one missing entry, the site configuration of the node's partition, read from the
simulation's record (:mod:`medfed.transport.simulation_sites`), and hands the message to
:data:`medfed.site.clientapp.app` unchanged. It is used only by the simulation: a deployed node
never loads it, so no run config can ever choose which configuration a real site loads.

Ray pickles the app with every message, so it holds only the record's path; each Ray worker
reads the record once.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.errors import ConfigError
from medfed.site.clientapp import NODE_CONFIG_KEY, app

# flwr.common.constant.PARTITION_ID_KEY: what the simulation engine puts in each node config.
PARTITION_ID_KEY = "partition-id"


class VirtualSiteApp(ClientApp):
    """medfed's ClientApp, for the virtual site of the node's partition."""

    def __init__(self, *, mapping_file: Path) -> None:
        super().__init__()
        self.mapping_file = str(Path(mapping_file).absolute())

    def __call__(self, message: Message, context: Context) -> Message:
        return app(message, site_context(context, mapping_file=self.mapping_file))


def site_context(context: Context, *, mapping_file: str) -> Context:
    """``context`` with the node's ``site-config``: the configuration of its partition."""
    partition = context.node_config.get(PARTITION_ID_KEY)
    configs = _site_configs(mapping_file)
    if not isinstance(partition, int) or not 0 <= partition < len(configs):
        raise ConfigError(
            f"virtual node {context.node_id} has partition {partition!r}, not one of the "
            f"{len(configs)} sites in {mapping_file}",
            hint="start simulations with `medfed simulate`, which maps nodes to sites",
        )
    node_config = {**context.node_config, NODE_CONFIG_KEY: configs[partition]}
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=context.state,
        run_config=context.run_config,
    )


@functools.cache
def _site_configs(mapping_file: str) -> tuple[str, ...]:
    data = json.loads(Path(mapping_file).read_text(encoding="utf-8"))
    return tuple(str(path) for path in data["configs"])
