"""Which sites take part in a round: online under their authenticated node key, still in the
run, and able to afford another round like their last under their own privacy terms.

Sites are told apart by the node public key Flower authenticated, matched against the keys
provisioned in the workspace, never by a name a node chose for itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from medfed.aggregator.context import RunContext
from medfed.run_events import SiteExhausted, SitesOnline

POLL_S = 1.0


def site_nodes(ctx: RunContext) -> dict[str, int]:
    """The run's sites online now, with the Flower node whose authenticated key is theirs."""
    found: dict[str, int] = {}
    for node in ctx.grid.get_nodes():
        site = ctx.workspace.site_for_node_key(bytes(node.public_key))
        if site is not None and site in ctx.sites:
            found[site] = int(node.node_id)
    return found


def online(ctx: RunContext) -> dict[str, int]:
    """The sites online now; the records of sites that left or came back follow."""
    nodes = site_nodes(ctx)
    for site, record in ctx.sites.items():
        if site not in nodes and record.status in ("waiting", "active"):
            record.status = "offline"
        elif site in nodes and record.status == "offline":
            record.status = "active"
    return nodes


def wait_for_sites(ctx: RunContext) -> dict[str, int]:
    """Wait until every site of the run is online, or ``wait_for_sites_s`` has passed."""
    deadline = time.monotonic() + ctx.settings.wait_for_sites_s
    while True:
        nodes = site_nodes(ctx)
        if len(nodes) == len(ctx.sites) or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    for site in nodes:
        ctx.sites[site].status = "active"
    missing = sorted(set(ctx.sites) - set(nodes))
    ctx.emit(
        SitesOnline(run_name=ctx.run_name, online=tuple(sorted(nodes)), missing=tuple(missing))
    )
    return online(ctx)


def select(ctx: RunContext, nodes: Mapping[str, int]) -> dict[str, int]:
    """Online sites that are still in the run and can afford another round like their last.

    The plan of a site's last round comes from its verified ledger, and the check is the one
    the site runs before it reserves (its accountant, delta and cap), so the aggregator does not
    send work a site would refuse.
    """
    selected: dict[str, int] = {}
    for site, node in sorted(nodes.items()):
        record = ctx.sites[site]
        if record.status != "active":
            continue
        if record.last_plan is not None and not ctx.tracker.can_afford(
            site_id=site, planned=record.last_plan
        ):
            record.status = "exhausted"
            record.last_reason = "another round would pass its privacy cap"
            ctx.emit(SiteExhausted(run_name=ctx.run_name, site=site, reason=record.last_reason))
            continue
        selected[site] = node
    return selected


def too_few(ctx: RunContext, sites: Iterable[str], what: str) -> str:
    """Why a run cannot go on: fewer sites than ``min_sites``."""
    names = sorted(sites)
    return (
        f"{len(names)} sites {what} ({', '.join(names) or 'none'}), fewer than min_sites "
        f"{ctx.settings.min_sites}"
    )
