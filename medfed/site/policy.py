"""A site's policy, checked against what a run asks: a run asks, the site's policy decides.

Three moments, each before anything it guards happens:

* :func:`request_problems` — before any data is read: networks, epochs, noise, rounds, project
  and run names (the network's size is counted by :func:`medfed.site.federated.check_policy`);
* :func:`resolve_noise` and :func:`check_round` — once the round's sampling plan is known and
  before anything is written: the site's own noise and per-round epsilon are ceilings the run
  cannot lift, and the policy's epsilon per round bounds what is left;
* :func:`check_run_history` — against the ledger: rounds are counted per run from what the
  ledger holds, never from what the request says.

Every broken rule is named in one :class:`PolicyError`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from medfed.config.run import RUN_NAME_PATTERN
from medfed.config.site import SiteConfig
from medfed.errors import PolicyError
from medfed.privacy import DPSteps, LedgerReport, compute_epsilon, noise_for_target_epsilon
from medfed.privacy.sampling import SamplingPlan

log = logging.getLogger("medfed.site")

_CHANGE_SETTINGS = "change the run settings, or the site's policy section if the site agrees"


@dataclass(frozen=True)
class RunRequest:
    """What a run asks of the site for one round, as far as its policy is concerned."""

    run_name: str
    project: str
    round: int
    planned_rounds: int
    network: str
    local_epochs: int
    noise_multiplier: float | None


def refuse(config: SiteConfig, request: RunRequest, problems: Sequence[str]) -> None:
    """Raise one PolicyError naming every problem (and log it), if there is any."""
    if not problems:
        return
    log.warning(
        "site %s declines run %r: %s",
        config.site_id,
        request.run_name,
        "; ".join(problems),
        extra={"run_id": request.run_name, "round": request.round, "site_id": config.site_id},
    )
    raise PolicyError(
        f"site {config.site_id} declines run {request.run_name!r}: " + "; ".join(problems),
        hint=_CHANGE_SETTINGS,
    )


def request_problems(config: SiteConfig, request: RunRequest) -> list[str]:
    """The broken rules that need nothing but the request and the policy."""
    policy = config.policy
    problems: list[str] = []
    if request.network not in policy.allowed_networks:
        problems.append(
            f"network {request.network!r} is not in policy.allowed_networks "
            f"{policy.allowed_networks}"
        )
    if request.local_epochs > policy.max_local_epochs:
        problems.append(
            f"{request.local_epochs} local epochs exceed policy.max_local_epochs "
            f"{policy.max_local_epochs}"
        )
    noise = request.noise_multiplier
    floor = policy.min_noise_multiplier
    if noise is not None and floor is not None and noise < floor:
        problems.append(
            f"noise multiplier {noise:g} is below policy.min_noise_multiplier {floor:g}"
        )
    if policy.max_rounds_per_run is not None and request.planned_rounds > policy.max_rounds_per_run:
        problems.append(
            f"the run plans {request.planned_rounds} rounds, more than "
            f"policy.max_rounds_per_run {policy.max_rounds_per_run}"
        )
    if not 0 <= request.round <= request.planned_rounds:
        problems.append(
            f"round {request.round} is outside the run's planned rounds 1 to "
            f"{request.planned_rounds}"
        )
    problems += _name_problems("run name", request.run_name, "accepted_runs", policy.accepted_runs)
    problems += _name_problems(
        "project", request.project, "accepted_projects", policy.accepted_projects
    )
    return problems


def _name_problems(what: str, name: str, rule: str, patterns: list[str]) -> list[str]:
    """A run's or project's name: valid, and matching one of the policy's globs."""
    if not RUN_NAME_PATTERN.match(name):
        return [f"{what} {name!r} is not a valid name"]
    # Case-sensitive on every platform: run and project names are identifiers.
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
        return [f"{what} {name!r} matches none of policy.{rule} {patterns}"]
    return []


def site_noise(config: SiteConfig, plan: SamplingPlan) -> float:
    """The site's own noise for ``plan``: its noise multiplier, or the one its target needs."""
    privacy = config.privacy
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    assert privacy.target_epsilon_per_round is not None
    return noise_for_target_epsilon(
        target_epsilon=privacy.target_epsilon_per_round,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


def resolve_noise(config: SiteConfig, plan: SamplingPlan, requested: float | None) -> float:
    """The noise a round trains with: the site's, or more when the run asks for more.

    A run that asks for less noise than the site's own setting (its noise multiplier, or what
    its per-round epsilon target needs) is refused: the site's settings are ceilings on the
    privacy a round may spend, and a run can only tighten them.
    """
    own = site_noise(config, plan)
    if requested is None or requested >= own:
        return own if requested is None else requested
    setting = (
        f"privacy.noise_multiplier {own:g}"
        if config.privacy.noise_multiplier is not None
        else f"noise {own:.4g}, what privacy.target_epsilon_per_round "
        f"{config.privacy.target_epsilon_per_round:g} needs for this round"
    )
    raise PolicyError(
        f"site {config.site_id} declines: the run asks for noise multiplier {requested:g}, "
        f"less than the site's {setting}",
        hint="ask for more noise (or none: the site's own applies), or change the site's "
        "privacy section if the site agrees",
    )


def check_round(config: SiteConfig, plan: DPSteps) -> None:
    """The limits that need the round's plan: minimum noise, epsilon of this round alone."""
    policy, privacy = config.policy, config.privacy
    problems: list[str] = []
    floor = policy.min_noise_multiplier
    if floor is not None and plan.noise_multiplier < floor:
        problems.append(
            f"noise multiplier {plan.noise_multiplier:.4g} is below the site policy's "
            f"min_noise_multiplier {floor:g}"
        )
    alone = compute_epsilon(history=[plan], delta=privacy.delta, accountant=privacy.accountant)
    limits = [("policy.max_epsilon_per_round", config.max_epsilon_per_round)]
    if privacy.target_epsilon_per_round is not None:
        # The search stops within 1% below the target: allow for its tolerance, no more.
        limits.append(("privacy.target_epsilon_per_round", privacy.target_epsilon_per_round))
    for name, limit in limits:
        if alone > limit * (1 + 1e-9):
            problems.append(
                f"this round alone would spend epsilon {alone:.3f}, above {name} {limit:g}"
            )
    if problems:
        raise PolicyError(
            f"site {config.site_id} declines the round: " + "; ".join(problems),
            hint="fewer local epochs or more noise in the run settings",
        )


def check_run_history(
    config: SiteConfig, report: LedgerReport, *, run_id: str, round: int, planned_rounds: int
) -> None:
    """Rounds are counted per run from the ledger: a run cannot restart its own count.

    The run keeps the planned rounds it started with, and the rounds the ledger holds for it
    never pass its plan or the policy's limit. A round already in the ledger may be trained
    again only when its first attempt sent nothing (the site stopped mid-round); the caller
    refuses a second model for a round already answered.
    """
    earlier = report.runs(run_id)
    problems: list[str] = []
    first = next((r.planned_rounds for r in earlier if r.planned_rounds is not None), None)
    if first is not None and first != planned_rounds:
        problems.append(
            f"run {run_id!r} started with {first} planned rounds and now asks for {planned_rounds}"
        )
    rounds = {r.round for r in earlier}
    limit = min(planned_rounds, config.policy.max_rounds_per_run or planned_rounds)
    if round not in rounds and len(rounds) >= limit:
        problems.append(
            f"the ledger holds {len(rounds)} rounds of run {run_id!r} already, the most "
            f"it may have ({limit})"
        )
    if problems:
        raise PolicyError(
            f"site {config.site_id} declines round {round} of run {run_id!r}: "
            + "; ".join(problems),
            hint="start a new run under a new name; the site's lifetime cap still applies",
        )
