"""One training round and the final evaluation, as the aggregator runs them.

Every reply is read through the site's verified ledger: its new lines are checked against the
site's registered key and chained onto the aggregator's copy first (a raised cap or delta is a
privacy alert), then the update must be covered by a committed reservation of this round, be
weighted by a released patient count, and fit the global model (names, shapes, dtypes, finite
values, round id); a commit entry that names other weights than those sent and received
binds the spend to another model. Anything else drops the update with its reasons. What was
accepted (update digest, ledger seqs, commit seq) goes into the round's record.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medfed.aggregator.budget import SiteBudget
from medfed.aggregator.context import RunContext
from medfed.aggregator.messages import declined, send, send_each
from medfed.aggregator.outcome import weighted_mean
from medfed.aggregator.releases import RoundRecord, finite_value, model_dice, round_record
from medfed.aggregator.run_store import ReceivedUpdate
from medfed.aggregator.selection import online
from medfed.aggregator.strategies import RoundAggregation
from medfed.aggregator.validation import validate_update
from medfed.envelope import EVALUATE, TRAIN, read_decline, read_evaluation, read_reply
from medfed.errors import MedfedError
from medfed.numbers import finite_or_none
from medfed.privacy import CommitEntry, LedgerReport, ReserveEntry
from medfed.run_events import (
    Evaluation,
    EvaluationFailed,
    PrivacyAlert,
    ReleaseNote,
    RoundStarted,
    SiteRejected,
    SiteUpdated,
)
from medfed.types import SiteUpdate, weights_digest

log = logging.getLogger("medfed.aggregator")


@dataclass
class RoundOutcome:
    """The sites whose updates were usable, and the released numbers to average over them.

    The updates themselves are not kept: each went into the round's aggregation as it was read.
    """

    sites: list[str] = field(default_factory=list)
    dice_before: dict[str, tuple[float, int]] = field(default_factory=dict)
    losses: dict[str, tuple[float, int]] = field(default_factory=dict)
    seconds: float = 0.0
    start_sha256: str = ""  # the global model the round started from
    updates: dict[str, ReceivedUpdate] = field(default_factory=dict)  # for the round record


def train_round(
    ctx: RunContext,
    round_index: int,
    selected: Mapping[str, int],
    weights: Mapping[str, np.ndarray],
    aggregation: RoundAggregation,
) -> RoundOutcome:
    """Ask ``selected`` to train from ``weights``; what came back usable.

    Replies are read as they arrive, and each usable update goes into ``aggregation`` at once
    (the weighted means fold it into a running sum), so a round holds one reply at a time.
    """
    ctx.emit(RoundStarted(run_name=ctx.run_name, round=round_index, sites=tuple(sorted(selected))))
    started = time.monotonic()
    digest = weights_digest(weights)
    outcome = RoundOutcome(start_sha256=digest)
    for site, reply in send_each(ctx, TRAIN, round_index, selected, weights):
        if declined(ctx, site, round_index, reply):
            continue
        record = ctx.sites[site]
        received: ReceivedUpdate | None = None
        try:
            answer = read_reply(reply.content)
            problems = []
            if answer.site_id != site:
                problems.append(f"reply claims to be from site {answer.site_id!r}")
            budget = receive(ctx, site, round_index, answer.ledger_first_seq, answer.ledger_lines)
            ledger = round_record(
                ctx.tracker.report(site),
                run_id=ctx.run_name,
                round=round_index,
                model_sha256=digest,
            )
            problems += coverage_problems(ledger, round_index)
            weight = math.nan if ledger.patients is None else ledger.patients.value
            if ledger.patients is not None and math.isnan(weight):
                problems.append(
                    "the site's patient count is sealed (released for secure aggregation): a "
                    "plain round cannot weight its update"
                )
            update = SiteUpdate(
                site_id=site,
                round=answer.round,
                weights=answer.weights,
                num_patients=0 if math.isnan(weight) else int(weight),
            )
            problems += validate_update(
                update=update, reference=weights, expected_round=round_index
            )
            received, unbound = bind_update(
                ctx.tracker.report(site),
                run_id=ctx.run_name,
                round=round_index,
                model_sha256=digest,
                update_sha256=weights_digest(answer.weights),
                first_seq=answer.ledger_first_seq,
                lines=len(answer.ledger_lines),
            )
            problems += unbound
        except MedfedError as exc:
            problems = [exc.message]
        if problems:
            record.status = "failed"
            record.last_reason = "; ".join(problems)
            ctx.emit(
                SiteRejected(
                    run_name=ctx.run_name, site=site, round=round_index, reasons=tuple(problems)
                )
            )
            continue
        record.rounds += 1
        record.num_patients = update.num_patients
        record.last_loss = finite_value(ledger.loss)
        record.last_plan = ledger.plan
        aggregation.add(update=update)
        outcome.sites.append(site)
        assert received is not None  # no problems: the commit was found
        outcome.updates[site] = received
        outcome.dice_before[site] = (finite_value(ledger.dice), validation_weight(ctx, site))
        outcome.losses[site] = (record.last_loss, update.num_patients)
        ctx.emit(
            SiteUpdated(
                run_name=ctx.run_name,
                site=site,
                round=round_index,
                patients=update.num_patients,
                loss=finite_or_none(record.last_loss),
                dice_before=finite_or_none(finite_value(ledger.dice)),
                releases=releases(ledger),
                epsilon_spent=finite_or_none(budget.epsilon_spent),
                epsilon_cap=budget.epsilon_cap,
                delta=budget.delta,
                accountant=budget.accountant,
            )
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def receive(
    ctx: RunContext, site: str, round_index: int, first_seq: int, lines: Sequence[str]
) -> SiteBudget:
    """Store the site's new ledger lines; alert on raised caps or deltas."""
    receipt = ctx.tracker.receive(site_id=site, first_seq=first_seq, lines=lines)
    for alert in receipt.alerts:
        log.warning("%s", alert)
        ctx.emit(PrivacyAlert(run_name=ctx.run_name, site=site, round=round_index, alert=alert))
    return receipt.budget


def bind_update(
    report: LedgerReport,
    *,
    run_id: str,
    round: int,
    model_sha256: str,
    update_sha256: str,
    first_seq: int,
    lines: int,
) -> tuple[ReceivedUpdate | None, list[str]]:
    """The round's commit entry for the update received, or why the update is not its.

    A commit that names other weights than the model sent and the update received says the
    ledger paid for something else; a commit without digests (a site older than them) binds
    by run and round only.
    """
    commit = _round_commit(report, run_id=run_id, round=round)
    if commit is None:
        return None, []  # coverage_problems names the missing commit
    problems = [
        f"the site's commit entry (seq {commit.seq}) names {what} {named[:12]}... but "
        f"{actual[:12]}... was {how}"
        for what, named, actual, how in (
            ("the global model", commit.model_sha256, model_sha256, "sent"),
            ("the update", commit.update_sha256, update_sha256, "received"),
        )
        if named is not None and named != actual
    ]
    received = ReceivedUpdate(
        update_sha256=update_sha256,
        ledger_first_seq=first_seq,
        ledger_last_seq=first_seq + lines - 1 if lines else None,
        commit_seq=commit.seq,
    )
    return received, problems


def _round_commit(report: LedgerReport, *, run_id: str, round: int) -> CommitEntry | None:
    """The ledger's last commit entry of a reservation of ``run_id``'s round ``round``.

    Searched from the end: the round's commit came with the reply being read, so it is among
    the last few entries, and each commit's reservation is found by its seq (a verified
    ledger's entry ``seq`` is its index) instead of through every reservation of the ledger.
    """
    entries = report.entries
    for entry in reversed(entries):
        if not isinstance(entry, CommitEntry) or not 0 <= entry.reservation_seq < len(entries):
            continue
        reserved = entries[entry.reservation_seq]
        if (
            isinstance(reserved, ReserveEntry)
            and reserved.seq == entry.reservation_seq
            and reserved.run_id == run_id
            and reserved.round == round
        ):
            return entry
    return None


def coverage_problems(ledger: RoundRecord, round_index: int) -> list[str]:
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


def releases(ledger: RoundRecord) -> dict[str, ReleaseNote]:
    """Which mechanism released each number of a site's round (for events and MLflow)."""
    return {
        name: released.note
        for name, released in (
            ("patients", ledger.patients),
            ("loss", ledger.loss),
            ("dice_before", ledger.dice),
        )
        if released is not None
    }


def validation_weight(ctx: RunContext, site: str) -> int:
    """The site's released validation count: what its Dice is averaged with."""
    entry = ctx.tracker.report(site).latest_release("patients")
    return 0 if entry is None or entry.sealed is not None else int(entry.values["validation"])


def evaluation_nodes(ctx: RunContext) -> dict[str, int]:
    """The sites asked to evaluate the final model: online, and active or out of budget."""
    return {
        site: node
        for site, node in online(ctx).items()
        if ctx.sites[site].status in ("active", "exhausted")
    }


def evaluate(ctx: RunContext, round_index: int, weights: Mapping[str, np.ndarray]) -> float:
    """Federated evaluation of the final model: the Dice each online site releases for it."""
    nodes = evaluation_nodes(ctx)
    if not nodes:
        return math.nan
    digest = weights_digest(weights)
    scores: dict[str, tuple[float, int]] = {}
    notes: dict[str, ReleaseNote] = {}
    for site, reply in sorted(send(ctx, EVALUATE, round_index, nodes, weights).items()):
        if reply.has_error():
            _failed(ctx, site, read_decline(reply.error).reason)
            continue
        try:
            evaluation = read_evaluation(reply.content)
            receive(ctx, site, round_index, evaluation.ledger_first_seq, evaluation.ledger_lines)
        except MedfedError as exc:
            _failed(ctx, site, exc.message)
            continue
        dice = model_dice(ctx.tracker.report(site), run_id=ctx.run_name, model_sha256=digest)
        if dice is None:
            _failed(ctx, site, "the site released no Dice")
            continue
        ctx.sites[site].dice = dice.value
        scores[site] = (dice.value, validation_weight(ctx, site))
        notes[site] = dice.note
    dice_mean = weighted_mean(scores)
    ctx.emit(
        Evaluation(
            run_name=ctx.run_name,
            round=round_index,
            dice=finite_or_none(dice_mean),
            sites={s: finite_or_none(d) for s, (d, _) in scores.items()},
            releases=notes,
        )
    )
    return dice_mean


def _failed(ctx: RunContext, site: str, reason: str) -> None:
    ctx.emit(EvaluationFailed(run_name=ctx.run_name, site=site, reason=reason))
