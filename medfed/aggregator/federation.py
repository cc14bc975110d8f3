"""The aggregator's round loop, over any Flower ``Grid`` (the deployment's or the in-process one).

What Flower's own strategies leave out and this loop adds: a minimum of successful sites per
round and a round timeout; every reply validated and dropped with a logged reason
(:mod:`~medfed.aggregator.rounds`); each site's privacy budget tracked from the signed ledger
entries it sends; sites whose budget is spent no longer asked
(:mod:`~medfed.aggregator.selection`); and a clean end, with a summary and the run's report,
when the rounds are done or too few sites remain (:mod:`~medfed.aggregator.finish`).
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.serverapp import Grid

from medfed.aggregator.budget import BudgetTracker
from medfed.aggregator.central_dp import check_central_dp, round_aggregation, site_level_event
from medfed.aggregator.context import RunContext
from medfed.aggregator.finish import fail, finish
from medfed.aggregator.messages import initial_model
from medfed.aggregator.outcome import FederationResult, SiteRecord, weighted_mean
from medfed.aggregator.rounds import evaluate, train_round
from medfed.aggregator.run_store import ResumePoint, RunStore, record_sha256, round_record
from medfed.aggregator.secure_round import SecureRun, check_settings
from medfed.aggregator.selection import online, select, too_few, wait_for_sites
from medfed.aggregator.site_level_ledger import SiteLevelLedger, site_level_ledger_path
from medfed.aggregator.strategies import FedAdamState
from medfed.config.run import RunSettings
from medfed.errors import ConfigError, MedfedError
from medfed.model_average import ModelAverage
from medfed.numbers import finite_or_none
from medfed.run_events import EventCallback, RoundDone, RunStarted
from medfed.types import weights_digest
from medfed.workspace import Workspace


def run_federation(
    *,
    grid: Grid,
    settings: RunSettings,
    workspace: Workspace,
    on_event: EventCallback | None = None,
) -> FederationResult:
    """Run (or resume) the federation ``settings`` describe; return its summary."""
    check_settings(settings)
    store = RunStore(paths=workspace.layout.run(settings.run_name))
    resume = store.start(settings)
    tracker = BudgetTracker(
        directory=workspace.layout.ledgers,
        public_keys={
            s.site_id: workspace.ledger_public_key(s.site_id) for s in workspace.manifest.sites
        },
    )
    ctx = RunContext(
        grid=grid,
        settings=settings,
        workspace=workspace,
        store=store,
        tracker=tracker,
        on_event=on_event,
        receipt_key=workspace.receipt_signing_key(),
    )
    wanted = settings.sites or [s.site_id for s in workspace.manifest.sites]
    unknown = sorted(set(wanted) - {s.site_id for s in workspace.manifest.sites})
    if unknown:
        raise ConfigError(
            f"run {settings.run_name!r} names sites the workspace does not know: {unknown}",
            hint="use the site ids given to `medfed provision --sites`",
        )
    check_central_dp(
        settings=settings.strategy,
        sites=len(wanted),
        secure_aggregation=bool(getattr(settings, "secure_aggregation", False)),
    )
    if settings.strategy.central_dp is not None:
        ctx.site_level = SiteLevelLedger(path=site_level_ledger_path(store.directory))
    ctx.sites = {site: SiteRecord(site_id=site) for site in wanted}
    ctx.emit(
        RunStarted(
            run_name=ctx.run_name,
            flower_run_id=grid.run.run_id,
            resume_from=None if resume is None else resume.round,
            rounds=settings.rounds,
            sites=tuple(wanted),
            settings=settings.model_dump(mode="json"),
        )
    )
    try:
        return _run(ctx, resume)
    except MedfedError as exc:
        fail(ctx, exc)
        raise


def _run(ctx: RunContext, resume: ResumePoint | None) -> FederationResult:
    settings = ctx.settings
    nodes = wait_for_sites(ctx)
    if len(nodes) < settings.min_sites:
        return finish(ctx, "stopped", too_few(ctx, nodes, "online"), completed=0)
    if resume is None:
        start = initial_model(ctx, nodes)
        if start is None:
            return finish(ctx, "stopped", "no site could initialise the model", completed=0)
        weights, spec = start
        record = round_record(
            run_name=ctx.run_name,
            round=0,
            previous=None,
            start_sha256=None,
            global_sha256=weights_digest(weights),
            updates={},
        )
        ctx.store.save_round(
            round=0, weights=weights, spec=spec, strategy_state=None, metadata=record
        )
        first_round, strategy_state = 1, None
    else:
        weights, spec = dict(resume.weights), dict(resume.spec)
        record = dict(resume.record)
        first_round = resume.round + 1
        strategy_state = (
            FedAdamState.from_arrays(resume.strategy_state) if resume.strategy_state else None
        )
    average = None
    if settings.ema is not None:
        # rebuilt from the global models kept for every round (none yet on a fresh run)
        average = ModelAverage.resumed(
            decay=settings.ema.decay, paths=ctx.store.paths, last_round=first_round - 1
        )
    dice_initial = math.nan
    completed = first_round - 1
    model_dir: Path | None = None
    secure = None
    if settings.secure_aggregation:
        counts = [] if resume is None else resume.record.get("distributed_counts", [])
        secure = SecureRun(ctx, counts=[float(c) for c in counts])
    for round_index in range(first_round, settings.rounds + 1):
        selected = select(ctx, online(ctx))
        if len(selected) < settings.min_sites:
            reason = too_few(ctx, selected, "with budget left")
            return finish(ctx, "stopped", reason, completed, model_dir, dice_initial)
        aggregation = round_aggregation(
            settings=settings.strategy,
            global_weights=weights,
            cohort=len(selected),
            ledger=ctx.site_level,
            run_name=ctx.run_name,
            round=round_index,
            rounds=settings.rounds,
        )
        if secure is None:
            outcome = train_round(ctx, round_index, selected, weights, aggregation)
        else:
            secured = secure.train_round(round_index, selected, weights, aggregation)
            if secured is None:
                continue  # abandoned, an event says why: the global model stays as it was
            outcome = secured
        if round_index == first_round and outcome.dice_before:
            dice_initial = weighted_mean(outcome.dice_before)
        if len(outcome.sites) < settings.min_sites:
            reason = (
                f"round {round_index}: {len(outcome.sites)} usable updates, fewer than "
                f"min_sites {settings.min_sites}"
            )
            return finish(ctx, "stopped", reason, completed, model_dir, dice_initial)
        result = aggregation.finish(state=strategy_state)
        weights, strategy_state = dict(result.weights), result.state
        record = round_record(
            run_name=ctx.run_name,
            round=round_index,
            previous=record,
            start_sha256=outcome.start_sha256,
            global_sha256=weights_digest(weights),
            updates=outcome.updates,
            distributed_counts=None
            if secure is None or settings.distributed_noise is None
            else secure.counts,
        )
        model_dir = ctx.store.save_round(
            round=round_index,
            weights=weights,
            spec=spec,
            strategy_state=None if strategy_state is None else strategy_state.to_arrays(),
            metadata=record,
        )
        completed = round_index
        if average is not None:
            average.add(round=round_index, weights=weights)
        if ctx.site_level is not None:
            ctx.emit(
                site_level_event(
                    ledger=ctx.site_level,
                    settings=settings.strategy,
                    run_name=ctx.run_name,
                    round=round_index,
                    cohort=len(selected),
                )
            )
        ctx.emit(
            RoundDone(
                run_name=ctx.run_name,
                round=round_index,
                sites_answered=len(outcome.sites),
                sites_asked=len(selected),
                dice_before=finite_or_none(weighted_mean(outcome.dice_before)),
                loss=finite_or_none(weighted_mean(outcome.losses)),
                seconds=round(outcome.seconds, 3),
                bytes_sent=ctx.bytes_sent,
                bytes_received=ctx.bytes_received,
                epsilon={s: finite_or_none(b) for s, b in _epsilons(ctx).items()},
            )
        )
    if average is not None and average.rounds:
        # the average of the rounds' models is the run's final model: evaluated, registered
        model_dir = average.write(
            paths=ctx.store.paths,
            run_name=ctx.run_name,
            spec=spec,
            trace_head=record_sha256(record),
        )
        weights = average.weights()
    if secure is not None:
        dice_final = secure.evaluate(completed, weights)
    else:
        dice_final = evaluate(ctx, completed, weights)
    return finish(
        ctx, "finished", "all rounds done", completed, model_dir, dice_initial, dice_final
    )


def _epsilons(ctx: RunContext) -> dict[str, float]:
    return {
        site: budget.epsilon_spent
        for site, budget in ctx.tracker.all().items()
        if site in ctx.sites
    }
