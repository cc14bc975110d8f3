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

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medfed.config.site import SiteConfig
from medfed.envelope import (
    decline_error,
    evaluation_content,
    init_content,
    read_request,
    reply_content,
    secure_content,
)
from medfed.errors import ConfigError, DataError, EnvelopeError, MedfedError
from medfed.site.release import shareable, unexpected

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
    kind = message.metadata.message_type
    run_id, round_ = _run_and_round(message)
    try:
        config = site_config_from(context)
    except MedfedError as exc:
        # No site config: no site id, no workdir to record in; the node log says why.
        extra = {"run_id": run_id, "round": round_, "site_id": None}
        log.warning("site node declines %s: %s", kind, exc.one_line(), extra=extra)
        return Message(decline_error(exc), reply_to=message)
    extra = {"run_id": run_id, "round": round_, "site_id": config.site_id}
    error: str | None = None
    try:
        reply = Message(work(config, message), reply_to=message)
    except MedfedError as exc:
        # The site's log keeps the reason, the aggregator gets what the release policy lets
        # cross (medfed.site.release): patient paths and ids never do.
        shared = shareable(exc)
        error = shared.one_line()
        log.warning(
            "site %s declines %s: %s", config.site_id, kind, _local_reason(config, exc), extra=extra
        )
        return Message(decline_error(shared), reply_to=message)
    except Exception as exc:
        # An exception's text may hold shapes or values of the data: the aggregator gets one
        # fixed sentence, the traceback stays in the node's log.
        log.exception("site %s failed on %s", config.site_id, kind, extra=extra)
        error = f"unexpected {type(exc).__name__} (see the node log)"
        return Message(decline_error(unexpected()), reply_to=message)
    finally:
        _record(config, run_id=run_id, round_=round_, kind=kind, error=error)
    log.info("site %s answered %s", config.site_id, kind, extra=extra)
    return reply


def _local_reason(config: SiteConfig, exc: MedfedError) -> str:
    """What the node's log says; a dataset refusal points at the site's list of problems,
    because node logs are often collected off the site and must not name patient files."""
    if isinstance(exc, DataError):
        from medfed.data.screen import problems_file

        listed = problems_file(config.paths.workdir)
        return (
            f"the dataset failed its check: {listed} lists its problems "
            "(`medfed data check --config SITE.yaml` too)"
        )
    return exc.one_line()


def _run_and_round(message: Message) -> tuple[str, int]:
    """The medfed run name and round a request names, else Flower's run id and -1.

    Read without validating the request: a malformed one is still recorded, and then refused
    by the handler with its own error.
    """
    run_id = f"flower-{message.metadata.run_id}"
    round_ = -1
    try:
        config = message.content["config"] if message.has_content() else None
    except (KeyError, TypeError):
        config = None
    if isinstance(config, ConfigRecord):
        name = config.get("run_name")
        if isinstance(name, str) and name:
            run_id = name
        number = config.get("round")
        if isinstance(number, int) and not isinstance(number, bool):
            round_ = number
    return run_id, round_


def _record(config: SiteConfig, *, run_id: str, round_: int, kind: str, error: str | None) -> None:
    from medfed.site.node_status import record_message

    try:
        record_message(config=config, run_id=run_id, round=round_, kind=kind, error=error)
    except OSError as exc:
        # The status file is for operators; it must never cost the federation a reply.
        log.warning("site %s: cannot record node status (%s)", config.site_id, exc.strerror)


def _train(config: SiteConfig, message: Message) -> RecordDict:
    from medfed.site.federated import train_round

    request = read_request(_content(message))
    if request.secure_aggregation is not None:
        from medfed.site.secure_round import masked_round

        return secure_content(masked_round(config=config, request=request))
    return reply_content(train_round(config=config, request=request))


def _secure(stage: str) -> Callable[[SiteConfig, Message], RecordDict]:
    """The handler of one secure aggregation stage (:mod:`medfed.site.secure_round`)."""

    def work(config: SiteConfig, message: Message) -> RecordDict:
        from medfed.site import secure_round

        request = read_request(_content(message))
        handler = {
            "keys": secure_round.advertise,
            "shares": secure_round.share,
            "open": secure_round.open_received,
            "unmask": secure_round.unmask,
        }[stage]
        return secure_content(handler(config=config, request=request))

    return work


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


@app.query("secagg_keys")
def secagg_keys(message: Message, context: Context) -> Message:
    return _handle(message, context, _secure("keys"))


@app.query("secagg_shares")
def secagg_shares(message: Message, context: Context) -> Message:
    return _handle(message, context, _secure("shares"))


@app.query("secagg_open")
def secagg_open(message: Message, context: Context) -> Message:
    return _handle(message, context, _secure("open"))


@app.query("secagg_unmask")
def secagg_unmask(message: Message, context: Context) -> Message:
    return _handle(message, context, _secure("unmask"))
