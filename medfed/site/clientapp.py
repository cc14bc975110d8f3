"""The Flower ClientApp of a medfed site node.

Hospital IT names the site's configuration in the SuperNode's node config
(``--node-config "site-config='/etc/medfed/site.yaml'"``); the run's settings arrive with each
message. Every refusal (budget spent, policy, bad data, a rolled-back ledger) is a reply with a
Flower ``Error`` that names the reason, never a crash of the node. Heavy libraries are imported
inside the handlers, because Flower starts a new process for every message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError, MedfedError
from medfed.transport.envelope import (
    EnvelopeError,
    decline_error,
    evaluation_content,
    init_content,
    read_request,
    reply_content,
)

log = logging.getLogger("medfed.site")

NODE_CONFIG_KEY = "site-config"

app = ClientApp()


def site_config_from(context: Context) -> SiteConfig:
    """Load the site configuration the node config points at."""
    from medfed.config import load_site_config

    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"this node has no {NODE_CONFIG_KEY!r} in its node config",
            hint="start the node with `medfed site start --config SITE.yaml`",
        )
    return load_site_config(Path(path))


def _handle(
    message: Message,
    context: Context,
    work: Callable[[SiteConfig, Message], RecordDict],
) -> Message:
    site = "?"
    try:
        config = site_config_from(context)
        site = config.site_id
        return Message(work(config, message), reply_to=message)
    except MedfedError as exc:
        log.warning("site %s declines %s: %s", site, message.metadata.message_type, exc.message)
        return Message(decline_error(exc), reply_to=message)


def _train(config: SiteConfig, message: Message) -> RecordDict:
    from medfed.site.federated import train_round

    request = read_request(_content(message))
    return reply_content(train_round(config=config, request=request))


def _evaluate(config: SiteConfig, message: Message) -> RecordDict:
    from medfed.site.federated import evaluate_round

    request = read_request(_content(message))
    return evaluation_content(evaluate_round(config=config, request=request))


def _init(config: SiteConfig, message: Message) -> RecordDict:
    from medfed.site.federated import initial_model

    request = read_request(_content(message))
    return init_content(initial_model(config=config, request=request))


def _content(message: Message) -> RecordDict:
    if not message.has_content():
        raise EnvelopeError("the message has no content")
    return message.content


@app.train()
def train(message: Message, context: Context) -> Message:
    return _handle(message, context, _train)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _handle(message, context, _evaluate)


@app.query("init")
def init(message: Message, context: Context) -> Message:
    return _handle(message, context, _init)
