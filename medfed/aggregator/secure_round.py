"""The aggregator's side of secure aggregation (:mod:`medfed.secagg`): it routes, then sums.

A key epoch starts before its first round (:mod:`medfed.aggregator.secure_epoch`: keys,
shares, opening; once per run unless a site drops out). Each round then costs one masked
upload per site and one small unmasking answer: the aggregator adds the masked vectors,
removes the masks with the answers, and decodes the *sum* of the survivors' weighted weight
changes, their total weight and their summed loss. Only that sum reaches the round's
aggregation, as one update: the weighted mean (:mod:`medfed.secagg.update`), or with
distributed noise the step of the sites' noisy gradient sum
(:mod:`medfed.aggregator.distributed_step`). The final model's evaluation is one more masked
sum, of the sites' validation counts and count-weighted Dice, under the epoch's last round id
(:func:`medfed.secagg.update.evaluation_round`). No code here holds one site's unmasked update,
count or metric, and the sites' ledgers hold their counts and Dice sealed.

What is still checked per site: its signed ledger lines (budget, a committed reservation of the
round, a commit naming the global model it trained from). A site that fails a check, declines
or stays silent is treated as dropped: its masks are removed with the others' shares, and its
input is not in the sum. Below the threshold the round is abandoned, an event says why and the
global model stays as it was. After a round with a dropped site, the next round starts a new
key epoch (a dropped site's masks of the epoch may have been revealed).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from medfed.aggregator.context import RunContext
from medfed.aggregator.distributed_step import distributed_step
from medfed.aggregator.messages import declined, send_each
from medfed.aggregator.releases import round_record
from medfed.aggregator.rounds import RoundOutcome, coverage_problems, evaluation_nodes, receive
from medfed.aggregator.run_store import ReceivedUpdate
from medfed.aggregator.secure_epoch import SecureEpoch, reject, stage, start_epoch
from medfed.aggregator.strategies import RoundAggregation
from medfed.aggregator.validation import validate_update
from medfed.config.run import RunSettings
from medfed.envelope import (
    SECAGG_UNMASK,
    TRAIN,
    SecureReply,
    read_decline,
    read_secure,
)
from medfed.errors import MedfedError, SecureAggregationError
from medfed.numbers import finite_or_none
from medfed.privacy import CommitEntry
from medfed.run_events import (
    Evaluation,
    EvaluationFailed,
    RoundStarted,
    SecureRoundAbandoned,
    SiteUpdated,
)
from medfed.secagg import (
    MaskedInput,
    UnmaskAnswer,
    UnmaskRequest,
    decode_weighted_sum,
    keys_to_recover,
    unmask_sum,
    wire,
)
from medfed.secagg.update import EXTRAS, MeanUpdate, evaluation_round, mean_update
from medfed.types import SiteUpdate, weights_digest

WEIGHTED_MEANS: Final = ("fedavg", "fedprox", "fedadam")
SUM_SITE: Final = "secure-sum"
EVALUATION_EXTRAS: Final = 1  # the Dice, as dice x bound


def check_settings(settings: RunSettings) -> None:
    """Refuse secure aggregation with a strategy that needs each site's update.

    Raises:
        SecureAggregationError: A robust strategy (median, trimmed mean) with it on.
    """
    if settings.secure_aggregation and settings.strategy.name not in WEIGHTED_MEANS:
        raise SecureAggregationError(
            f"secure aggregation sums the sites' updates, and strategy "
            f"{settings.strategy.name!r} needs each site's update",
            hint=f"use one of {', '.join(WEIGHTED_MEANS)} with secure aggregation, or turn it off",
        )


@dataclass
class SecureRun:
    """Secure aggregation across a run's rounds: the current key epoch, renewed as needed."""

    ctx: RunContext
    current: SecureEpoch | None = None
    renew: bool = False
    # distributed noise: each round's noisy patient count (the steps divide by their mean),
    # carried in the round records so that a resumed run continues the mean
    counts: list[float] = field(default_factory=list)

    def train_round(
        self,
        round_index: int,
        selected: Mapping[str, int],
        weights: Mapping[str, np.ndarray],
        aggregation: RoundAggregation,
    ) -> RoundOutcome | None:
        """One secure round; None when it was abandoned (the global model stays)."""
        ctx = self.ctx
        started = time.monotonic()
        epoch = self.current
        if epoch is None or self.renew or round_index not in epoch.rounds:
            # the epoch's last round id is the run's secure evaluation
            rounds = tuple(range(round_index, evaluation_round(ctx.settings.rounds) + 1))
            try:
                epoch = start_epoch(ctx, selected, epoch=round_index, rounds=rounds)
            except MedfedError as exc:
                self.current = None
                _abandon(ctx, round_index, round_index, f"no key epoch: {exc.message}")
                return None
            self.current, self.renew = epoch, False
        outcome, dropped = secure_round(
            ctx, epoch, round_index, selected, weights, aggregation, counts=self.counts
        )
        self.renew = bool(dropped) or outcome is None
        if outcome is not None:
            outcome.seconds = time.monotonic() - started  # a new key epoch's stages included
        return outcome

    def evaluate(self, round_index: int, weights: Mapping[str, np.ndarray]) -> float:
        """The final model's federated Dice as one masked sum (:func:`secure_evaluation`),
        under the current key epoch or, after a dropout, a new one; NaN when there is none."""
        ctx = self.ctx
        nodes = evaluation_nodes(ctx)
        mask_round = evaluation_round(ctx.settings.rounds)
        epoch = self.current
        if epoch is None or self.renew or not set(epoch.members) <= set(nodes):
            try:
                epoch = start_epoch(ctx, nodes, epoch=mask_round, rounds=(mask_round,))
            except MedfedError as exc:
                _evaluation_failed(ctx, f"no key epoch: {exc.message}")
                return math.nan
        return secure_evaluation(ctx, epoch, round_index, nodes, weights)


def secure_evaluation(
    ctx: RunContext,
    epoch: SecureEpoch,
    round_index: int,
    nodes: Mapping[str, int],
    weights: Mapping[str, np.ndarray],
) -> float:
    """The Dice of the model of round ``round_index`` over the epoch's sites, as one masked sum.

    Each site answers ``[c, c * dice * bound]`` masked, for its sealed validation count ``c``
    and its sealed Dice release (``c`` = 0 when it releases none); the aggregator learns the
    sum, so the count-weighted mean Dice, and no site's own Dice or count. The event names no
    site.
    """
    settings = ctx.settings
    mask_round = evaluation_round(settings.rounds)
    asked = {site: node for site, node in nodes.items() if site in epoch.members}
    payload = {**_stage_payload(settings, epoch, mask_round), "evaluate": True}
    masked: dict[str, MaskedInput] = {}
    secure = {site: payload for site in asked}
    for site, reply in send_each(ctx, TRAIN, round_index, asked, weights, secure=secure):
        if reply.has_error():
            _evaluation_failed(ctx, read_decline(reply.error).reason, site=site)
            continue
        try:
            answer = read_secure(reply.content)
            problems = _reply_problems(ctx, site, answer, epoch, mask_round, "evaluation")
        except MedfedError as exc:
            problems = [exc.message]
        if problems:
            _evaluation_failed(ctx, "; ".join(problems), site=site)
            continue
        masked[site] = _masked_input(ctx, site, answer, epoch, mask_round)
    dropped = tuple(sorted(set(epoch.members) - set(masked)))
    try:
        words = _unmask(ctx, epoch, mask_round, masked, asked, dropped)
        total = decode_weighted_sum(
            point=epoch.point, total=words, sites=len(masked), extras=EVALUATION_EXTRAS
        )
    except MedfedError as exc:
        _evaluation_failed(ctx, exc.message)
        return math.nan
    if total.update.size or total.weight < 1:
        reason = "no site released a Dice" if total.weight < 1 else "the sum has an update"
        _evaluation_failed(ctx, reason)
        return math.nan
    dice = total.extras[0] / settings.secure_aggregation_bound / total.weight
    ctx.emit(Evaluation(run_name=ctx.run_name, round=round_index, dice=finite_or_none(dice)))
    return dice


def _stage_payload(settings: RunSettings, epoch: SecureEpoch, round_id: int) -> dict[str, Any]:
    """What a masked stage tells each site: the epoch's round and the encoding's parameters."""
    return {
        "epoch": epoch.epoch,
        "round": round_id,
        "sites": len(epoch.members),
        "max_weight": settings.secure_aggregation_max_weight,
        "bound": settings.secure_aggregation_bound,
    }


def _reply_problems(
    ctx: RunContext, site: str, answer: SecureReply, epoch: SecureEpoch, round_id: int, what: str
) -> list[str]:
    """What any masked reply must be (from the site asked, masked, for this epoch's round);
    its ledger lines are received on the way (a bad line raises)."""
    problems = []
    if answer.site_id != site:
        problems.append(f"reply claims to be from site {answer.site_id!r}")
    if answer.masked is None:
        problems.append(f"the reply holds no masked {what}")
    if dict(answer.payload) != {"epoch": epoch.epoch, "round": round_id}:
        problems.append(f"the masked {what} is for {dict(answer.payload)}")
    receive(ctx, site, round_id, answer.ledger_first_seq, answer.ledger_lines)
    return problems


def _masked_input(
    ctx: RunContext, site: str, answer: SecureReply, epoch: SecureEpoch, round_id: int
) -> MaskedInput:
    assert answer.masked is not None  # checked by _reply_problems
    return MaskedInput(
        site_id=site, run_id=ctx.run_name, epoch=epoch.epoch, round=round_id, vector=answer.masked
    )


def _evaluation_failed(ctx: RunContext, reason: str, *, site: str = SUM_SITE) -> None:
    ctx.emit(EvaluationFailed(run_name=ctx.run_name, site=site, reason=reason))


def secure_round(
    ctx: RunContext,
    epoch: SecureEpoch,
    round_index: int,
    selected: Mapping[str, int],
    weights: Mapping[str, np.ndarray],
    aggregation: RoundAggregation,
    *,
    counts: list[float],
) -> tuple[RoundOutcome | None, tuple[str, ...]]:
    """One masked round: the outcome (None: abandoned) and the members that dropped out.

    ``counts``: the run's noisy patient counts of earlier distributed-noise rounds.
    """
    settings = ctx.settings
    asked = {site: node for site, node in selected.items() if site in epoch.members}
    ctx.emit(RoundStarted(run_name=ctx.run_name, round=round_index, sites=tuple(sorted(asked))))
    started = time.monotonic()
    digest = weights_digest(weights)
    payload = _stage_payload(settings, epoch, round_index)
    if settings.distributed_noise is not None:
        payload["distributed"] = settings.distributed_noise.model_dump(mode="json")
    masked: dict[str, MaskedInput] = {}
    received: dict[str, ReceivedUpdate] = {}
    secure = {site: payload for site in asked}
    for site, reply in send_each(ctx, TRAIN, round_index, asked, weights, secure=secure):
        if declined(ctx, site, round_index, reply):
            continue
        try:
            answer = read_secure(reply.content)
            problems = _upload_problems(ctx, site, answer, epoch, round_index, digest)
        except MedfedError as exc:
            problems = [exc.message]
        if problems:
            reject(ctx, site, round_index, problems)
            continue
        masked[site] = _masked_input(ctx, site, answer, epoch, round_index)
        received[site] = _received(ctx, site, answer, round_index)
        # the round's plan, for the check that the site can afford the next one
        report = ctx.tracker.report(site)
        plan = round_record(report, run_id=ctx.run_name, round=round_index, model_sha256=digest)
        ctx.sites[site].last_plan = plan.plan
    survivors = tuple(sorted(masked))
    dropped = tuple(sorted(set(epoch.members) - set(survivors)))
    try:
        words = _unmask(ctx, epoch, round_index, masked, asked, dropped)
        if settings.distributed_noise is not None:
            mean = distributed_step(
                settings=settings,
                round_index=round_index,
                words=words,
                reference=weights,
                counts=counts,
            )
        else:
            total = decode_weighted_sum(
                point=epoch.point, total=words, sites=len(survivors), extras=EXTRAS
            )
            bound = settings.secure_aggregation_bound
            mean = mean_update(total=total, reference=weights, bound=bound)
    except MedfedError as exc:
        _abandon(ctx, round_index, epoch.epoch, exc.message)
        return None, dropped
    update = SiteUpdate(
        site_id=SUM_SITE, round=round_index, weights=mean.weights, num_patients=mean.total_weight
    )
    problems = validate_update(update=update, reference=weights, expected_round=round_index)
    if problems or mean.total_weight < 1:
        _abandon(ctx, round_index, epoch.epoch, "; ".join(problems) or "total weight 0")
        return None, dropped
    aggregation.add(update=update)
    outcome = RoundOutcome(start_sha256=digest)
    outcome.sites = list(survivors)
    outcome.updates = received
    if mean.loss is not None:
        outcome.losses = {SUM_SITE: (mean.loss, mean.total_weight)}
    _record_sites(ctx, round_index, survivors, mean)
    outcome.seconds = time.monotonic() - started
    return outcome, dropped


def _unmask(
    ctx: RunContext,
    epoch: SecureEpoch,
    round_index: int,
    masked: Mapping[str, MaskedInput],
    nodes: Mapping[str, int],
    dropped: tuple[str, ...],
) -> np.ndarray:
    """The sum of the survivors' inputs, every mask removed (uint32 words)."""
    survivors = tuple(sorted(masked))
    if len(survivors) < epoch.roster.threshold:
        raise SecureAggregationError(
            f"{len(survivors)} of {len(epoch.members)} sites sent a masked update, "
            f"{epoch.roster.threshold} needed to unmask a sum"
        )
    shares = ctx.settings.distributed_noise
    if shares is not None and len(survivors) < shares.sites:
        # the sites would refuse to unmask it: their noise shares count on this many inputs
        raise SecureAggregationError(
            f"{len(survivors)} of {len(epoch.members)} sites sent a masked update, and each "
            f"site's noise share counts on {shares.sites} sites' shares in the sum"
        )
    request = UnmaskRequest(
        run_id=ctx.run_name,
        epoch=epoch.epoch,
        round=round_index,
        survivors=survivors,
        dropped=dropped,
    )
    answers = _answers(ctx, epoch, round_index, request, {s: nodes[s] for s in survivors})
    recover = keys_to_recover(request=request, answers=answers)
    if recover:
        follow_up = UnmaskRequest(
            run_id=request.run_id,
            epoch=request.epoch,
            round=request.round,
            survivors=survivors,
            dropped=dropped,
            recover_keys=recover,
        )
        answered = {a.site_id: nodes[a.site_id] for a in answers}
        answers += _answers(ctx, epoch, round_index, follow_up, answered)
    total = unmask_sum(
        roster=epoch.roster, request=request, masked=list(masked.values()), answers=answers
    )
    return total.total


def _answers(
    ctx: RunContext,
    epoch: SecureEpoch,
    round_index: int,
    request: UnmaskRequest,
    nodes: Mapping[str, int],
) -> list[UnmaskAnswer]:
    payload = {"epoch": epoch.epoch, "request": wire.request_to_json(request)}
    answers = []
    for site, reply in stage(ctx, SECAGG_UNMASK, round_index, nodes, {s: payload for s in nodes}):
        answer = wire.read("unmask answer", reply.payload["answer"], wire.answer_from_json)
        if answer.site_id != site:
            raise SecureAggregationError(f"{site} answered for {answer.site_id}")
        answers.append(answer)
    return answers


def _upload_problems(
    ctx: RunContext,
    site: str,
    answer: SecureReply,
    epoch: SecureEpoch,
    round_index: int,
    digest: str,
) -> list[str]:
    """Why a site's masked upload cannot be summed: its ledger must cover the round."""
    problems = _reply_problems(ctx, site, answer, epoch, round_index, "update")
    report = ctx.tracker.report(site)
    ledger = round_record(report, run_id=ctx.run_name, round=round_index, model_sha256=digest)
    problems += coverage_problems(ledger, round_index)
    commit = _commit(ctx, site, round_index)
    if commit is not None and commit.model_sha256 not in (None, digest):
        problems.append(
            f"the site's commit entry (seq {commit.seq}) names the global model "
            f"{commit.model_sha256[:12]}... but {digest[:12]}... was sent"
        )
    return problems


def _commit(ctx: RunContext, site: str, round_index: int) -> CommitEntry | None:
    report = ctx.tracker.report(site)
    reserved = {r.seq for r in report.runs(ctx.run_name) if r.round == round_index}
    commits = [
        e for e in report.entries if isinstance(e, CommitEntry) and e.reservation_seq in reserved
    ]
    return commits[-1] if commits else None


def _received(ctx: RunContext, site: str, answer: SecureReply, round_index: int) -> ReceivedUpdate:
    """The round record's entry of a masked upload: the digest of what was received."""
    commit = _commit(ctx, site, round_index)
    assert answer.masked is not None and commit is not None  # checked by _upload_problems
    lines = len(answer.ledger_lines)
    return ReceivedUpdate(
        update_sha256=hashlib.sha256(np.ascontiguousarray(answer.masked).tobytes()).hexdigest(),
        ledger_first_seq=answer.ledger_first_seq,
        ledger_last_seq=answer.ledger_first_seq + lines - 1 if lines else None,
        commit_seq=commit.seq,
    )


def _record_sites(
    ctx: RunContext, round_index: int, survivors: tuple[str, ...], mean: MeanUpdate
) -> None:
    """Each survivor's record and event: its privacy spend only (its numbers are in the sum)."""
    for site in survivors:
        record = ctx.sites[site]
        record.rounds += 1
        record.status = "active"
        budget = ctx.tracker.all().get(site)
        ctx.emit(
            SiteUpdated(
                run_name=ctx.run_name,
                site=site,
                round=round_index,
                epsilon_spent=None if budget is None else finite_or_none(budget.epsilon_spent),
                epsilon_cap=None if budget is None else budget.epsilon_cap,
                delta=None if budget is None else budget.delta,
                accountant=None if budget is None else budget.accountant,
            )
        )


def _abandon(ctx: RunContext, round_index: int, epoch: int, reason: str) -> None:
    ctx.emit(
        SecureRoundAbandoned(run_name=ctx.run_name, round=round_index, epoch=epoch, reason=reason)
    )
