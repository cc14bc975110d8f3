"""The aggregator's messages to sites: one request per site, its reply or its silence.

What Flower's strategies leave out and these add: every message is a site's own copy with a
round timeout; a site that does not answer in time is left out by name; a refusal is read as
the site's decline (its code, and a reason only where the site's release policy lets one
cross); and the initial model comes from a site, since the aggregator builds no networks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

import numpy as np
from flwr.app import Message

from medfed.aggregator.context import RunContext
from medfed.envelope import INIT, RoundRequest, read_decline, read_init, request_content
from medfed.errors import MedfedError
from medfed.privacy.receipt import make_receipt
from medfed.run_events import (
    ModelInitialised,
    SiteDeclined,
    SiteRejected,
    SiteReplied,
    SiteTimeout,
)


def request(
    ctx: RunContext,
    site: str,
    round_index: int,
    weights: Mapping[str, np.ndarray] | None,
    secure: Mapping[str, Any] | None = None,
) -> RoundRequest:
    """What the run asks of ``site`` for one round (the site checks it against its policy);
    ``secure`` is the site's part of a secure aggregation stage, if any."""
    settings = ctx.settings
    return RoundRequest(
        run_name=settings.run_name,
        project=settings.project,
        round=round_index,
        planned_rounds=settings.rounds,
        model=settings.model.model_dump(mode="json"),
        local_epochs=settings.local_epochs,
        learning_rate=settings.learning_rate,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        proximal_mu=settings.strategy.proximal_mu,
        seed=settings.seed,
        ledger_known=ctx.tracker.known_entries(site),
        weights=weights,
        ledger_receipt=ledger_receipt(ctx, site),
        secure_aggregation=secure,
    )


def ledger_receipt(ctx: RunContext, site: str) -> str | None:
    """The signed receipt of the site's ledger entries the aggregator holds (None: no key)."""
    if ctx.receipt_key is None:
        return None
    report = ctx.tracker.report(site)
    return make_receipt(
        site_id=site,
        count=len(report.entries),
        last_hash=report.last_hash,
        private_key=ctx.receipt_key,
    )


# Flower's Grid.send_and_receive looks for replies every 3 s; pulling every REPLY_POLL_S instead
# ends a message stage within that of its last reply (each pull is one request to the SuperLink).
REPLY_POLL_S: Final = 0.2


def send(
    ctx: RunContext,
    kind: str,
    round_index: int,
    nodes: Mapping[str, int],
    weights: Mapping[str, np.ndarray] | None,
    *,
    secure: Mapping[str, Mapping[str, Any]] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Message]:
    """One message per site (each its own records); the replies by site."""
    return dict(
        send_each(ctx, kind, round_index, nodes, weights, secure=secure, timeout_s=timeout_s)
    )


def send_each(
    ctx: RunContext,
    kind: str,
    round_index: int,
    nodes: Mapping[str, int],
    weights: Mapping[str, np.ndarray] | None,
    *,
    secure: Mapping[str, Mapping[str, Any]] | None = None,
    timeout_s: float | None = None,
) -> Iterator[tuple[str, Message]]:
    """Send one message per site and yield each site's reply as it arrives.

    A site silent within the timeout (the round's unless ``timeout_s`` is given) is marked
    offline and named in an event once the others have answered or the timeout passed.
    ``secure`` holds each site's part of a secure aggregation stage.
    """
    settings = ctx.settings
    timeout_s = settings.round_timeout_s if timeout_s is None else timeout_s
    by_node = {node: site for site, node in nodes.items()}
    messages = [
        Message(
            request_content(
                request(ctx, site, round_index, weights, None if secure is None else secure[site])
            ),
            dst_node_id=node,
            message_type=kind,
            group_id=f"{settings.run_name}/{round_index}",
            ttl=timeout_s + 60.0,
        )
        for site, node in nodes.items()
    ]
    ctx.bytes_sent += sum(array_bytes(message) for message in messages)
    answered: set[str] = set()
    for reply in _replies(ctx, messages, timeout_s=timeout_s):
        site = by_node.get(int(reply.metadata.src_node_id))
        if site is not None and site not in answered:
            answered.add(site)
            ctx.bytes_received += array_bytes(reply)
            ctx.emit(
                SiteReplied(run_name=ctx.run_name, site=site, round=round_index, message_type=kind)
            )
            yield site, reply
    for site in sorted(set(nodes) - answered):
        record = ctx.sites[site]
        record.status = "offline"
        record.last_reason = f"no reply to {kind} within {timeout_s:g} s"
        ctx.emit(
            SiteTimeout(run_name=ctx.run_name, site=site, round=round_index, message_type=kind)
        )


def _replies(ctx: RunContext, messages: list[Message], *, timeout_s: float) -> Iterator[Message]:
    waiting = set(ctx.grid.push_messages(messages))
    deadline = time.monotonic() + timeout_s
    while waiting:
        for reply in ctx.grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            yield reply
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(REPLY_POLL_S)


def array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (the weights: nearly all of what moves)."""
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())


def declined(ctx: RunContext, site: str, round_index: int, reply: Message) -> bool:
    """Whether ``reply`` is the site's refusal; it is recorded and named if so."""
    if not reply.has_error():
        return False
    decline = read_decline(reply.error)
    record = ctx.sites[site]
    record.last_reason = decline.reason
    record.status = "exhausted" if decline.budget_spent else "declined"
    ctx.emit(
        SiteDeclined(
            run_name=ctx.run_name,
            site=site,
            round=round_index,
            code=decline.code,
            reason=decline.reason,
        )
    )
    return True


def initial_model(
    ctx: RunContext, nodes: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Ask sites, one at a time, for a seeded network: the aggregator builds no models."""
    for site, node in sorted(nodes.items()):
        reply = send(ctx, INIT, 0, {site: node}, None).get(site)
        if reply is None or declined(ctx, site, 0, reply):
            continue
        try:
            init = read_init(reply.content)
        except MedfedError as exc:
            ctx.emit(
                SiteRejected(run_name=ctx.run_name, site=site, round=0, reasons=(exc.message,))
            )
            continue
        parameters = int(sum(a.size for a in init.weights.values()))
        ctx.emit(ModelInitialised(run_name=ctx.run_name, site=site, parameters=parameters))
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in init.weights.items()}
        return weights, dict(init.spec)
    return None
