"""The key epoch of secure aggregation, as the aggregator runs it: keys, shares, opening.

The aggregator forwards the sites' ledger public keys from its provisioned registry, checks the
signed key bundles itself (a forged or unsigned one is excluded, named in the ``secure_epoch``
event and its site's record), routes each site's encrypted shares to their recipients, and
learns who opened them: the epoch's members, who hold each other's shares. It holds no secret
of any site: the shares are encrypted for their recipients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization

from medfed.aggregator.context import RunContext
from medfed.aggregator.messages import declined, send
from medfed.envelope import SECAGG_KEYS, SECAGG_OPEN, SECAGG_SHARES, SecureReply, read_secure
from medfed.errors import MedfedError, SecureAggregationError
from medfed.run_events import SecureEpochStarted, SiteRejected
from medfed.secagg import FixedPoint, KeyBundle, KeyRoster, verify_bundles, wire
from medfed.secagg.update import run_encoding

# Keys, shares, opening and unmasking are small and quick: a site silent this long is gone.
STAGE_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class SecureEpoch:
    """A key epoch in place: its roster, its members (the sites holding each other's shares)
    and the encoding their sums use."""

    epoch: int
    rounds: tuple[int, ...]
    roster: KeyRoster
    members: tuple[str, ...]
    point: FixedPoint


def start_epoch(
    ctx: RunContext, nodes: Mapping[str, int], *, epoch: int, rounds: tuple[int, ...]
) -> SecureEpoch:
    """Keys, shares and opening for ``rounds``: the epoch's members and encoding.

    Raises:
        SecureAggregationError: Fewer than two sites' bundles verify, or fewer sites than the
            threshold take part to the end, or the sites disagree on the members.
    """
    settings = ctx.settings
    registry = {site: _raw_public(ctx, site) for site in sorted(nodes)}
    keys_payload: dict[str, Any] = {
        "epoch": epoch,
        "rounds": list(rounds),
        "ledger_keys": registry,
    }
    if ctx.settings.distributed_noise is not None:
        # so that a site whose policy refuses distributed noise says so before any key exchange
        keys_payload["distributed"] = ctx.settings.distributed_noise.model_dump(mode="json")
    bundles: list[KeyBundle] = []
    for _site, reply in stage(ctx, SECAGG_KEYS, epoch, nodes, {s: keys_payload for s in nodes}):
        bundles.append(wire.read("key bundle", reply.payload["bundle"], wire.bundle_from_json))
    roster = verify_bundles(
        bundles=bundles,
        ledger_keys={site: ctx.workspace.ledger_public_key(site) for site in nodes},
        run_id=ctx.run_name,
        epoch=epoch,
    )
    excluded = dict(roster.excluded)
    every = [wire.bundle_to_json(b) for b in bundles]
    in_roster = {site: nodes[site] for site in roster.sites}
    outgoing: dict[str, list[dict[str, Any]]] = {site: [] for site in roster.sites}
    senders: list[str] = []
    shares_payload = {"epoch": epoch, "bundles": every}
    for site, reply in stage(
        ctx, SECAGG_SHARES, epoch, in_roster, {s: shares_payload for s in in_roster}
    ):
        items = wire.read(
            "share list",
            reply.payload,
            lambda p: [wire.encrypted_from_json(e) for e in p["shares"]],
        )
        for why_site, why in dict(reply.payload.get("excluded", {})).items():
            excluded.setdefault(str(why_site), f"{site}: {why}")
        for item in items:
            if item.sender != site or item.recipient not in outgoing:
                raise SecureAggregationError(
                    f"{site} sent shares from {item.sender} for {item.recipient}",
                    hint="start a new key epoch",
                )
            outgoing[item.recipient].append(wire.encrypted_to_json(item))
        senders.append(site)
    openers = {site: nodes[site] for site in senders}
    open_payloads = {
        site: {
            "epoch": epoch,
            "shares": [e for e in outgoing[site] if e["sender"] in openers],
        }
        for site in openers
    }
    views: dict[str, tuple[str, ...]] = {}
    for site, reply in stage(ctx, SECAGG_OPEN, epoch, openers, open_payloads):
        views[site] = wire.read(
            "member list", reply.payload, lambda p: tuple(str(m) for m in p["members"])
        )
    agreed = set(views.values())
    if len(agreed) != 1 or len(views) < roster.threshold:
        raise SecureAggregationError(
            f"key epoch {epoch}: {len(views)} site(s) opened their shares ({roster.threshold} "
            f"needed), with {len(agreed)} view(s) of the members",
            hint="start the key epoch again once the sites are online",
        )
    (members,) = agreed
    point = run_encoding(
        sites=len(members),
        max_weight=settings.secure_aggregation_max_weight,
        bound=settings.secure_aggregation_bound,
    )
    for site, why in excluded.items():
        if site in ctx.sites:
            ctx.sites[site].status = "failed"
            ctx.sites[site].last_reason = f"left out of secure aggregation: {why}"
    ctx.emit(
        SecureEpochStarted(
            run_name=ctx.run_name,
            epoch=epoch,
            rounds=rounds,
            sites=members,
            excluded=excluded,
            threshold=roster.threshold,
        )
    )
    return SecureEpoch(epoch=epoch, rounds=rounds, roster=roster, members=members, point=point)


def stage(
    ctx: RunContext,
    kind: str,
    round_index: int,
    nodes: Mapping[str, int],
    payloads: Mapping[str, Mapping[str, Any]],
) -> list[tuple[str, SecureReply]]:
    """Send one stage's message to ``nodes``; the readable replies (declines are recorded)."""
    timeout_s = min(ctx.settings.round_timeout_s, STAGE_TIMEOUT_S)
    replies = send(ctx, kind, round_index, nodes, None, secure=payloads, timeout_s=timeout_s)
    readable = []
    for site, reply in sorted(replies.items()):
        if declined(ctx, site, round_index, reply):
            continue
        try:
            answer = read_secure(reply.content)
        except MedfedError as exc:
            reject(ctx, site, round_index, [exc.message])
            continue
        if answer.site_id != site:
            reject(ctx, site, round_index, [f"reply claims to be from {answer.site_id!r}"])
            continue
        readable.append((site, answer))
    return readable


def reject(ctx: RunContext, site: str, round_index: int, problems: list[str]) -> None:
    record = ctx.sites[site]
    record.status = "failed"
    record.last_reason = "; ".join(problems)
    ctx.emit(
        SiteRejected(run_name=ctx.run_name, site=site, round=round_index, reasons=tuple(problems))
    )


def _raw_public(ctx: RunContext, site: str) -> str:
    key = ctx.workspace.ledger_public_key(site)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
