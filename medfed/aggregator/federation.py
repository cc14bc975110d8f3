"""The aggregator's round loop, over any Flower ``Grid`` (the deployment's or the in-process one).

What Flower's own strategies leave out and this loop adds: a minimum of successful sites per
round and a round timeout; every reply validated (names, shapes, dtypes, finite values, round
id) and dropped with a logged reason; each site's privacy budget tracked from the signed ledger
entries it sends, checked against its registered key; sites whose budget is spent are no longer
asked; and a clean end, with a summary, when too few sites remain.

Sites are told apart by the node public key Flower authenticated, matched against the keys
provisioned in the workspace, never by a name a node chose for itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from medfed.aggregator.budget import BudgetTracker, SiteBudget
from medfed.aggregator.outcome import FederationResult, SiteRecord, finite, weighted_mean
from medfed.aggregator.releases import RoundRecord, finite_value, model_dice, round_record
from medfed.aggregator.run_store import ResumePoint, RunStore, run_directory
from medfed.aggregator.strategies import FedAdamState, aggregate
from medfed.aggregator.validation import validate_update
from medfed.config.run import RunSettings
from medfed.errors import ConfigError, MedfedError
from medfed.transport.envelope import (
    EVALUATE,
    INIT,
    TRAIN,
    RoundRequest,
    read_decline,
    read_evaluation,
    read_init,
    read_reply,
    request_content,
)
from medfed.transport.provision import Workspace
from medfed.types import SiteUpdate, weights_digest

log = logging.getLogger("medfed.aggregator")

_POLL_S = 1.0


@dataclass
class _Loop:
    grid: Grid
    settings: RunSettings
    workspace: Workspace
    store: RunStore
    tracker: BudgetTracker
    on_event: Callable[[dict[str, Any]], None] | None
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def emit(self, kind: str, **fields: Any) -> None:
        record = self.store.event(kind, run_name=self.settings.run_name, **fields)
        message = " ".join(f"{k}={v}" for k, v in fields.items() if k != "sites")
        log.info("%s %s", kind, message)
        if self.on_event is not None:
            self.on_event(record)


def run_federation(
    *,
    grid: Grid,
    settings: RunSettings,
    workspace: Workspace,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run (or resume) the federation ``settings`` describe; return its summary."""
    store = RunStore(directory=run_directory(workspace.root, settings.run_name))
    resume = store.start(settings)
    tracker = BudgetTracker(
        directory=workspace.root / "ledgers",
        public_keys={
            s.site_id: workspace.ledger_public_key(s.site_id) for s in workspace.manifest.sites
        },
    )
    loop = _Loop(
        grid=grid,
        settings=settings,
        workspace=workspace,
        store=store,
        tracker=tracker,
        on_event=on_event,
    )
    wanted = settings.sites or [s.site_id for s in workspace.manifest.sites]
    unknown = sorted(set(wanted) - {s.site_id for s in workspace.manifest.sites})
    if unknown:
        raise ConfigError(
            f"run {settings.run_name!r} names sites the workspace does not know: {unknown}",
            hint="use the site ids given to `medfed provision --sites`",
        )
    loop.sites = {site: SiteRecord(site_id=site) for site in wanted}
    loop.emit(
        "run_started",
        flower_run_id=grid.run.run_id,
        resume_from=None if resume is None else resume.round,
        rounds=settings.rounds,
        sites=wanted,
        settings=settings.model_dump(mode="json"),
    )
    try:
        return _run(loop, resume)
    except MedfedError as exc:
        loop.emit("run_failed", reason=exc.one_line())
        raise


def _run(loop: _Loop, resume: ResumePoint | None) -> FederationResult:
    settings = loop.settings
    nodes = _wait_for_sites(loop)
    if len(nodes) < settings.min_sites:
        return _finish(loop, "stopped", _too_few(loop, nodes, "online"), 0, None, math.nan)
    if resume is None:
        start = _initial_model(loop, nodes)
        if start is None:
            return _finish(loop, "stopped", "no site could initialise the model", 0, None, math.nan)
        weights, spec = start
        loop.store.save_round(
            round=0, weights=weights, spec=spec, strategy_state=None, metadata={"round": 0}
        )
        first_round, strategy_state = 1, None
    else:
        weights, spec = dict(resume.weights), dict(resume.spec)
        first_round = resume.round + 1
        strategy_state = (
            FedAdamState.from_arrays(resume.strategy_state) if resume.strategy_state else None
        )
    dice_initial = math.nan
    completed = first_round - 1
    model_dir: Path | None = None
    for round_index in range(first_round, settings.rounds + 1):
        nodes = _online(loop)
        selected = _select(loop, nodes)
        if len(selected) < settings.min_sites:
            reason = _too_few(loop, selected, "with budget left")
            return _finish(loop, "stopped", reason, completed, model_dir, dice_initial)
        outcome = _train_round(loop, round_index, selected, weights)
        if round_index == first_round and outcome.dice_before:
            dice_initial = weighted_mean(outcome.dice_before)
        if len(outcome.updates) < settings.min_sites:
            reason = (
                f"round {round_index}: {len(outcome.updates)} usable updates, fewer than "
                f"min_sites {settings.min_sites}"
            )
            return _finish(loop, "stopped", reason, completed, model_dir, dice_initial)
        result = aggregate(
            settings=settings.strategy,
            state=strategy_state,
            global_weights=weights,
            updates=outcome.updates,
        )
        weights, strategy_state = dict(result.weights), result.state
        model_dir = loop.store.save_round(
            round=round_index,
            weights=weights,
            spec=spec,
            strategy_state=None if strategy_state is None else strategy_state.to_arrays(),
            metadata={"round": round_index, "sites": [u.site_id for u in outcome.updates]},
        )
        completed = round_index
        loop.emit(
            "round_done",
            round=round_index,
            sites_answered=len(outcome.updates),
            sites_asked=len(selected),
            dice_before=finite(weighted_mean(outcome.dice_before)),
            loss=finite(weighted_mean(outcome.losses)),
            seconds=round(outcome.seconds, 3),
            bytes_sent=loop.bytes_sent,
            bytes_received=loop.bytes_received,
            epsilon={s: finite(b) for s, b in _epsilons(loop).items()},
        )
    dice_final = _evaluate(loop, completed, weights)
    return _finish(
        loop, "finished", "all rounds done", completed, model_dir, dice_initial, dice_final
    )


@dataclass
class _RoundOutcome:
    updates: list[Any] = field(default_factory=list)
    dice_before: dict[str, tuple[float, int]] = field(default_factory=dict)
    losses: dict[str, tuple[float, int]] = field(default_factory=dict)
    seconds: float = 0.0


def _site_nodes(loop: _Loop) -> dict[str, int]:
    """The run's sites online now, with the Flower node whose authenticated key is theirs."""
    found: dict[str, int] = {}
    for node in loop.grid.get_nodes():
        site = loop.workspace.site_for_node_key(bytes(node.public_key))
        if site is not None and site in loop.sites:
            found[site] = int(node.node_id)
    return found


def _online(loop: _Loop) -> dict[str, int]:
    nodes = _site_nodes(loop)
    for site, record in loop.sites.items():
        if site not in nodes and record.status in ("waiting", "active"):
            record.status = "offline"
        elif site in nodes and record.status == "offline":
            record.status = "active"
    return nodes


def _wait_for_sites(loop: _Loop) -> dict[str, int]:
    deadline = time.monotonic() + loop.settings.wait_for_sites_s
    while True:
        nodes = _site_nodes(loop)
        if len(nodes) == len(loop.sites) or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    for site in nodes:
        loop.sites[site].status = "active"
    missing = sorted(set(loop.sites) - set(nodes))
    loop.emit("sites_online", online=sorted(nodes), missing=missing)
    return _online(loop)


def _select(loop: _Loop, nodes: Mapping[str, int]) -> dict[str, int]:
    """Online sites that are still in the run and can afford another round like their last."""
    selected: dict[str, int] = {}
    for site, node in sorted(nodes.items()):
        record = loop.sites[site]
        if record.status not in ("active",):
            continue
        if record.last_plan is not None and not loop.tracker.can_afford(
            site_id=site, planned=record.last_plan
        ):
            record.status = "exhausted"
            record.last_reason = "another round would pass its privacy cap"
            loop.emit("site_exhausted", site=site, reason=record.last_reason)
            continue
        selected[site] = node
    return selected


def _request(
    loop: _Loop, site: str, round_index: int, weights: Mapping[str, np.ndarray] | None
) -> RoundRequest:
    settings = loop.settings
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
        ledger_known=loop.tracker.known_entries(site),
        weights=weights,
    )


def _send(
    loop: _Loop,
    kind: str,
    round_index: int,
    nodes: Mapping[str, int],
    weights: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, Message], list[str]]:
    """One message per site (each its own records); replies by site, and who never answered."""
    by_node = {node: site for site, node in nodes.items()}
    messages = [
        Message(
            request_content(_request(loop, site, round_index, weights)),
            dst_node_id=node,
            message_type=kind,
            group_id=f"{loop.settings.run_name}/{round_index}",
            ttl=loop.settings.round_timeout_s + 60.0,
        )
        for site, node in nodes.items()
    ]
    loop.bytes_sent += sum(_array_bytes(message) for message in messages)
    replies: dict[str, Message] = {}
    for reply in loop.grid.send_and_receive(messages, timeout=loop.settings.round_timeout_s):
        site = by_node.get(int(reply.metadata.src_node_id))
        if site is not None:
            replies[site] = reply
            loop.bytes_received += _array_bytes(reply)
    silent = sorted(set(nodes) - set(replies))
    for site in silent:
        loop.sites[site].status = "offline"
        loop.sites[
            site
        ].last_reason = f"no reply to {kind} within {loop.settings.round_timeout_s:g} s"
        loop.emit("site_timeout", site=site, round=round_index, message_type=kind)
    return replies, silent


def _array_bytes(message: Message) -> int:
    """Bytes of the arrays a message carries (the weights: nearly all of what moves)."""
    if not message.has_content():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())


def _declined(loop: _Loop, site: str, round_index: int, reply: Message) -> bool:
    if not reply.has_error():
        return False
    decline = read_decline(reply.error)
    record = loop.sites[site]
    record.last_reason = decline.reason
    record.status = "exhausted" if decline.budget_spent else "declined"
    loop.emit(
        "site_declined", site=site, round=round_index, code=decline.code, reason=decline.reason
    )
    return True


def _initial_model(
    loop: _Loop, nodes: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Ask sites, one at a time, for a seeded network: the aggregator builds no models."""
    for site, node in sorted(nodes.items()):
        replies, _ = _send(loop, INIT, 0, {site: node}, None)
        reply = replies.get(site)
        if reply is None or _declined(loop, site, 0, reply):
            continue
        try:
            init = read_init(reply.content)
        except MedfedError as exc:
            loop.emit("site_rejected", site=site, round=0, reasons=[exc.message])
            continue
        loop.emit(
            "model_initialised",
            site=site,
            parameters=int(sum(a.size for a in init.weights.values())),
        )
        return {k: np.asarray(v, dtype=np.float32) for k, v in init.weights.items()}, dict(
            init.spec
        )
    return None


def _train_round(
    loop: _Loop, round_index: int, selected: Mapping[str, int], weights: Mapping[str, np.ndarray]
) -> _RoundOutcome:
    loop.emit("round_started", round=round_index, sites=sorted(selected))
    started = time.monotonic()
    digest = weights_digest(weights)
    replies, _ = _send(loop, TRAIN, round_index, selected, weights)
    outcome = _RoundOutcome(seconds=0.0)
    for site, reply in sorted(replies.items()):
        if _declined(loop, site, round_index, reply):
            continue
        record = loop.sites[site]
        try:
            answer = read_reply(reply.content)
            problems = []
            if answer.site_id != site:
                problems.append(f"reply claims to be from site {answer.site_id!r}")
            budget = _receive(loop, site, round_index, answer.ledger_first_seq, answer.ledger_lines)
            ledger = round_record(
                loop.tracker.report(site),
                run_id=loop.settings.run_name,
                round=round_index,
                model_sha256=digest,
            )
            problems += _coverage_problems(ledger, round_index)
            update = SiteUpdate(
                site_id=site,
                round=answer.round,
                weights=answer.weights,
                num_patients=0 if ledger.patients is None else int(ledger.patients.value),
                metrics={},
            )
            problems += validate_update(
                update=update, reference=weights, expected_round=round_index
            )
        except MedfedError as exc:
            problems = [exc.message]
        if problems:
            record.status = "failed"
            record.last_reason = "; ".join(problems)
            loop.emit("site_rejected", site=site, round=round_index, reasons=problems)
            continue
        record.rounds += 1
        record.num_patients = update.num_patients
        record.last_loss = finite_value(ledger.loss)
        record.last_plan = ledger.plan
        outcome.updates.append(update)
        outcome.dice_before[site] = (finite_value(ledger.dice), _validation_weight(loop, site))
        outcome.losses[site] = (record.last_loss, update.num_patients)
        loop.emit(
            "site_update",
            site=site,
            round=round_index,
            patients=update.num_patients,
            loss=finite(record.last_loss),
            dice_before=finite(finite_value(ledger.dice)),
            releases=_releases(ledger),
            epsilon_spent=finite(budget.epsilon_spent),
            epsilon_cap=budget.epsilon_cap,
            delta=budget.delta,
            accountant=budget.accountant,
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def _receive(
    loop: _Loop, site: str, round_index: int, first_seq: int, lines: Sequence[str]
) -> SiteBudget:
    """Store the site's new ledger lines; alert on raised caps or deltas."""
    receipt = loop.tracker.receive(site_id=site, first_seq=first_seq, lines=lines)
    for alert in receipt.alerts:
        log.warning("%s", alert)
        loop.emit("privacy_alert", site=site, round=round_index, alert=alert)
    return receipt.budget


def _coverage_problems(ledger: RoundRecord, round_index: int) -> list[str]:
    """An update no committed reservation covers, or without a released count, is unusable."""
    problems = []
    if not ledger.committed:
        problems.append(
            f"the site's ledger holds no committed reservation of round {round_index}: its "
            "update is covered by no privacy spend"
        )
    if ledger.patients is None:
        problems.append("the site's ledger holds no released patient count to weight it by")
    return problems


def _releases(ledger: RoundRecord) -> dict[str, Any]:
    """Which mechanism released each number of a site's round (for events and MLflow)."""
    return {
        name: released.to_json()
        for name, released in (
            ("patients", ledger.patients),
            ("loss", ledger.loss),
            ("dice_before", ledger.dice),
        )
        if released is not None
    }


def _validation_weight(loop: _Loop, site: str) -> int:
    """The site's released validation count: what its Dice is averaged with."""
    entry = loop.tracker.report(site).latest_release("patients")
    return 0 if entry is None else int(entry.values["validation"])


def _evaluate(loop: _Loop, round_index: int, weights: Mapping[str, np.ndarray]) -> float:
    """Federated evaluation of the final model on every online site's validation split."""
    nodes = {
        site: node
        for site, node in _online(loop).items()
        if loop.sites[site].status in ("active", "exhausted")
    }
    if not nodes:
        return math.nan
    digest = weights_digest(weights)
    replies, _ = _send(loop, EVALUATE, round_index, nodes, weights)
    scores: dict[str, tuple[float, int]] = {}
    releases: dict[str, Any] = {}
    for site, reply in sorted(replies.items()):
        if reply.has_error():
            decline = read_decline(reply.error)
            loop.emit("evaluation_failed", site=site, reason=decline.reason)
            continue
        try:
            evaluation = read_evaluation(reply.content)
            _receive(loop, site, round_index, evaluation.ledger_first_seq, evaluation.ledger_lines)
        except MedfedError as exc:
            loop.emit("evaluation_failed", site=site, reason=exc.message)
            continue
        dice = model_dice(
            loop.tracker.report(site), run_id=loop.settings.run_name, model_sha256=digest
        )
        if dice is None:
            loop.emit("evaluation_failed", site=site, reason="the site released no Dice")
            continue
        loop.sites[site].dice = dice.value
        scores[site] = (dice.value, _validation_weight(loop, site))
        releases[site] = dice.to_json()
    dice_mean = weighted_mean(scores)
    loop.emit(
        "evaluation",
        round=round_index,
        dice=finite(dice_mean),
        sites={s: finite(d) for s, (d, _) in scores.items()},
        releases=releases,
    )
    return dice_mean


def _epsilons(loop: _Loop) -> dict[str, float]:
    return {
        site: budget.epsilon_spent
        for site, budget in loop.tracker.all().items()
        if site in loop.sites
    }


def _too_few(loop: _Loop, sites: Iterable[str], what: str) -> str:
    names = sorted(sites)
    return (
        f"{len(names)} sites {what} ({', '.join(names) or 'none'}), fewer than min_sites "
        f"{loop.settings.min_sites}"
    )


def _finish(
    loop: _Loop,
    status: str,
    reason: str,
    completed: int,
    model_dir: Path | None,
    dice_initial: float,
    dice_final: float = math.nan,
) -> FederationResult:
    budget_state = loop.tracker.state_json()
    budgets = budget_state["sites"]
    sites = [record.to_json(budgets.get(site)) for site, record in sorted(loop.sites.items())]
    if model_dir is None and completed > 0:
        model_dir = loop.store.directory / "global" / f"round-{completed:04d}"
    result = FederationResult(
        run_name=loop.settings.run_name,
        status=status,
        reason=reason,
        rounds_completed=completed,
        dice_initial=dice_initial,
        dice_final=dice_final,
        sites=sites,
        directory=loop.store.directory,
        model=model_dir,
    )
    summary = result.summary(budget_state)
    loop.store.write_summary(summary)
    loop.emit(
        "run_finished" if status == "finished" else "run_stopped",
        status=status,
        reason=reason,
        summary=summary,
    )
    return result
