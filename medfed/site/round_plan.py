"""A site's round, planned and checked before anything of it is reserved: the run's history,
the released patient counts, the sampling plan, the site's ceilings and its cap.

Nothing here builds a model or touches patient images; a round that cannot be trained within
the site's policy and budget is refused here, at the cost of at most the counts' release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from medfed.config.site import SiteConfig
from medfed.privacy.accounting import DPSteps
from medfed.privacy.budget import check_budget
from medfed.privacy.sampling import SamplingPlan, plan_site_sampling
from medfed.privacy.site_ledger import RoundPlan, SiteLedger
from medfed.site import policy, release
from medfed.site.release import PatientCounts

if TYPE_CHECKING:
    from medfed.data import SiteDatasets


@dataclass(frozen=True)
class RoundSetup:
    """A round as planned and checked, before anything of it is reserved."""

    counts: PatientCounts
    sampling: SamplingPlan
    plan: RoundPlan
    prior: tuple[DPSteps, ...]


def plan_round(
    *,
    config: SiteConfig,
    ledger: SiteLedger,
    datasets: SiteDatasets,
    run_id: str,
    round_index: int,
    planned_rounds: int | None,
    epochs: int,
    requested_noise: float | None,
    sealed_counts: bool = False,
) -> RoundSetup:
    """Plan one round from the released patient counts and check it: run, policy, budget.

    The run's history is checked first (it needs the ledger only); the counts are released
    when this dataset has none yet (their own small cost); then the plan, the site's ceilings
    and the cap are checked, all before the first step is reserved.

    ``sealed_counts`` (secure aggregation): the counts are released sealed, the delta is checked
    against the exact count, and the sample rate is ``training.sample_rate`` or 1, never one
    computed from a count the aggregator must not learn.
    """
    report = ledger.verify()  # a bad ledger stops the site before anything else
    if planned_rounds is not None:
        policy.check_run_history(
            config, report, run_id=run_id, round=round_index, planned_rounds=planned_rounds
        )
    counts = release.patient_counts(
        config=config,
        ledger=ledger,
        report=report,
        train_ids=[case.patient_id for case in datasets.train_cases],
        validation_ids=[case.patient_id for case in datasets.val_cases],
        run_id=run_id,
        round_index=round_index,
        sealed=sealed_counts,
    )
    rate = config.training.sample_rate
    if counts.sealed:
        exact = len(datasets.train_cases) + len(datasets.val_cases)
        release.check_delta(config, exact, released=False)
        rate = 1.0 if rate is None else rate
    else:
        release.check_delta(config, counts.total)
    # at a set rate the released count still scales the noisy mean (expected batch size q x N)
    sampling = plan_site_sampling(
        dataset_size=counts.train,
        batch_size=config.training.batch_size,
        sample_rate=rate,
        epochs=epochs,
    )
    plan = RoundPlan(
        run_id=run_id,
        round=round_index,
        planned_rounds=planned_rounds,
        steps=sampling.steps,
        sample_rate=sampling.sample_rate,
        noise_multiplier=policy.resolve_noise(config, sampling, requested_noise),
        max_grad_norm=config.privacy.max_grad_norm,
    )
    policy.check_round(config, plan.dp_steps)
    report = ledger.verify()  # with the counts' release, when this round made it
    terms = config.terms
    # Refuse early, before any model is built; reserve() checks again under the ledger's lock.
    check_budget(
        history=report.history, planned=plan.dp_steps, cap=terms.cap, accountant=terms.accountant
    )
    return RoundSetup(counts=counts, sampling=sampling, plan=plan, prior=report.history)
