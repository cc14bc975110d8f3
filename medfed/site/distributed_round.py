"""A site's round with distributed noise: one full-batch step, each patient on the integer grid.

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021. With one full-batch DP-SGD step per round at every site,
the sum of the sites' clipped per-patient gradients is one DP-SGD step over the union of their
patients; under secure aggregation each of ``k`` sites adds a ``1 / sqrt(k)`` share of the noise
and the sum still carries all of it. The site:

1. checks the run against its policy (``policy.distributed_noise``: allowed, at least
   ``min_sites`` shares, an RDP accountant) and plans the step: the noise multiplier ``z`` of the
   *sum* is the run's (or the site's own, whichever is larger), its share's standard deviation
   ``z * sensitivity / sqrt(k)`` in grid units;
2. reserves the step in its ledger with both guarantees (:class:`DistributedPlan`): the
   distributed epsilon (``k`` shares and secure aggregation hold) and the local one (its own share
   alone), the budget enforced on the one its policy names;
3. computes each patient's gradient at the global model (views averaged, as in DP-SGD), clips
   it to the run's bound, rotates, scales and rounds it to the grid (:mod:`medfed.secagg.grid`),
   sums them, adds one count coordinate (``count_weight`` per patient) and its discrete Gaussian
   share on every coordinate;
4. commits the step; the caller masks the vector.

The site releases no patient count, loss or Dice in such a round: its patient count is only in
the masked count coordinate, under its share of the noise. The exact count is used at the site
alone, to check that its delta is below one over it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.config.run import DistributedNoiseSettings
from medfed.config.site import SiteConfig
from medfed.errors import PolicyError
from medfed.privacy.distributed_noise import RDP_ACCOUNTANTS, DistributedNoise, DistributedPlan
from medfed.privacy.sampling import plan_sampling
from medfed.privacy.site_ledger import RoundPlan
from medfed.secagg.discrete_noise import discrete_gaussian, patient_vector
from medfed.secagg.grid import Grid, grid_for, to_words, wrap_problem
from medfed.site import policy, release
from medfed.types import weights_digest

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("medfed.site")

PATIENTS_PER_PASS = 8  # patients whose per-sample gradients are held at once


def check_allowed(config: SiteConfig, asked: DistributedNoiseSettings) -> None:
    """Refuse distributed noise the site's policy does not allow; every broken rule named."""
    rules = config.policy.distributed_noise
    problems = []
    if not rules.allowed:
        problems.append("policy.distributed_noise.allowed is false")
    if asked.sites < rules.min_sites:
        problems.append(
            f"the run counts on {asked.sites} sites' noise shares, fewer than "
            f"policy.distributed_noise.min_sites {rules.min_sites}"
        )
    if config.privacy.accountant not in RDP_ACCOUNTANTS:
        problems.append(
            f"privacy.accountant {config.privacy.accountant!r} cannot account for the distributed "
            f"discrete Gaussian (its bound is in Renyi DP): use one of {', '.join(RDP_ACCOUNTANTS)}"
        )
    if problems:
        raise PolicyError(
            f"site {config.site_id} declines distributed noise: " + "; ".join(problems),
            hint="run without distributed noise, or change policy.distributed_noise and the "
            "privacy section if the site agrees to trust secure aggregation and the other sites",
        )


def plan_step(
    *,
    config: SiteConfig,
    grid: Grid,
    asked: DistributedNoiseSettings,
    requested_noise: float | None,
    patients: int,
    run_id: str,
    round_index: int,
    planned_rounds: int,
) -> RoundPlan:
    """The round's plan, with both guarantees, checked against the policy (nothing written)."""
    sampling = plan_sampling(dataset_size=patients, batch_size=patients, epochs=1)
    total_noise = policy.resolve_noise(config, sampling, requested_noise)
    unit = DistributedNoise(
        clip=grid.clip,
        scale=grid.scale,
        beta=grid.beta,
        dim=grid.padded,
        local_stddev=1.0,
        count_weight=float(grid.count_weight),
    )
    # the share: the sum's noise over the patient's sensitivity, split into ``sites`` parts
    noise = dataclasses.replace(
        unit, local_stddev=total_noise * unit.l2_sensitivity / math.sqrt(asked.sites)
    )
    distributed = DistributedPlan(
        noise=noise, sites=asked.sites, budget=config.policy.distributed_noise.budget
    )
    plan = RoundPlan(
        run_id=run_id,
        round=round_index,
        planned_rounds=planned_rounds,
        steps=1,
        sample_rate=1.0,
        noise_multiplier=distributed.enforced_noise_multiplier,
        max_grad_norm=grid.clip,
        distributed=distributed,
    )
    policy.check_round(config, plan.dp_steps)
    return plan


def distributed_round(
    *,
    config: SiteConfig,
    asked: DistributedNoiseSettings,
    run_id: str,
    round_index: int,
    planned_rounds: int,
    weights: Mapping[str, np.ndarray],
    requested_noise: float | None,
    members: int,
    max_weight: int,
) -> np.ndarray:
    """Plan, reserve, compute and commit one distributed-noise step: the uint32 words to mask.

    ``config`` is the round's configuration (the run's settings applied and checked);
    ``members`` the sites of the key epoch and ``max_weight`` the run's largest patient count
    of a site, which bound what the sum can reach.
    """
    import torch

    from medfed.data import build_datasets
    from medfed.models import resolve_device
    from medfed.privacy.budget import check_budget
    from medfed.site.ledger_of import ledger_of
    from medfed.site.trainer import build_site_model

    check_allowed(config, asked)
    if members < asked.sites:
        raise PolicyError(
            f"site {config.site_id} declines the round: its noise share counts on {asked.sites} "
            f"sites' shares and the key epoch has {members} sites",
            hint="run with at least as many sites as distributed_noise.sites",
        )
    ledger = ledger_of(config)
    report = ledger.verify()
    policy.check_run_history(
        config, report, run_id=run_id, round=round_index, planned_rounds=planned_rounds
    )
    datasets = build_datasets(config)
    patients = len(datasets.train)
    # the exact count, at the site alone: nothing of it is released in such a round
    release.check_delta(config, patients + len(datasets.val), released=False)
    grid = grid_for(
        dim=sum(int(np.asarray(a).size) for a in weights.values()),
        clip=config.privacy.max_grad_norm,
        count_share=asked.count_share,
        run_id=run_id,
        round_id=round_index,
    )
    plan = plan_step(
        config=config,
        grid=grid,
        asked=asked,
        requested_noise=requested_noise,
        patients=patients,
        run_id=run_id,
        round_index=round_index,
        planned_rounds=planned_rounds,
    )
    share = plan.distributed
    assert share is not None
    summed_noise = math.sqrt(members) * share.noise.local_stddev
    wrap = wrap_problem(grid=grid, patients=members * max_weight, noise_std=summed_noise)
    if wrap is not None:
        raise PolicyError(
            f"site {config.site_id} declines the round: the sum of {members} sites' integer "
            f"vectors could wrap around: {wrap}",
            hint="lower secure_aggregation_max_weight or the noise, or use fewer sites",
        )
    terms = config.terms
    check_budget(
        history=report.history, planned=plan.dp_steps, cap=terms.cap, accountant=terms.accountant
    )
    datasets.train.set_random_state(config.training.seed + round_index)
    device = resolve_device(name=config.training.device, threads=config.training.threads)
    model, _spec = build_site_model(config=config, device=device, initial_weights=weights)
    reservation = ledger.reserve(plan=plan, terms=terms)
    words: np.ndarray | None = None
    try:
        with torch.random.fork_rng(devices=[]):
            total = _grid_sum(config=config, model=model, dataset=datasets.train, grid=grid)
        vector = np.concatenate([total, np.asarray([patients * grid.count_weight])])
        vector += discrete_gaussian(sigma=share.noise.local_stddev, count=vector.size)
        words = to_words(vector)
    finally:
        ledger.commit(
            reservation,
            steps=0 if words is None else 1,
            model_sha256=weights_digest(weights),
            update_sha256=None if words is None else hashlib.sha256(words.tobytes()).hexdigest(),
        )
    log.info(
        "site %s round %d: one distributed-noise step over its patients, share %.4g grid units "
        "(epsilon %s enforced)",
        config.site_id,
        round_index,
        share.noise.local_stddev,
        share.budget,
    )
    assert words is not None
    return words


def _grid_sum(*, config: SiteConfig, model: nn.Module, dataset: Any, grid: Grid) -> np.ndarray:
    """The sum over the site's patients of each one's clipped gradient on the grid (int64)."""
    import torch

    from medfed.models.checkpoint import unwrap
    from medfed.site.dp import patient_rows, per_sample_gradients
    from medfed.site.epochs import collate_patients

    views = config.training.augmentation_multiplicity
    module, gradients = per_sample_gradients(
        model=model,
        num_classes=len(config.data.classes),
        grad_sample_mode=config.training.grad_sample_mode,
    )
    layout = _layout(unwrap(module), grid.dim)
    module.train()
    device = next(model.parameters()).device
    total = np.zeros(grid.padded, dtype=np.int64)
    indices = list(range(len(dataset)))
    for start in range(0, len(indices), PATIENTS_PER_PASS):
        chosen = indices[start : start + PATIENTS_PER_PASS]
        items = [dataset[index] for index in chosen for _view in range(views)]
        batch = collate_patients(items=items, device=device)
        module.zero_grad(set_to_none=True)
        for parameter in module.parameters():
            parameter.grad_sample = None  # type: ignore[attr-defined]
        losses = gradients(batch["image"], batch["label"]).detach()
        patient_rows(module, losses, views=views)
        rows = np.zeros((len(chosen), grid.dim), dtype=np.float64)
        for parameter, offset in layout:
            sample: torch.Tensor = parameter.grad_sample
            flat = sample.detach().reshape(len(chosen), -1).to("cpu", torch.float64).numpy()
            rows[:, offset : offset + flat.shape[1]] = flat
        norms = np.linalg.norm(rows, axis=1)
        # Opacus' clipping factor: min(1, C / (norm + 1e-6)).
        rows *= np.minimum(1.0, grid.clip / (norms + 1e-6))[:, None]
        for row in rows:
            total += patient_vector(
                row, seed=grid.rotation_seed, scale=grid.scale, l2_bound=grid.l2_bound
            )
    return total


def _layout(model: nn.Module, dim: int) -> list[tuple[Any, int]]:
    """Each trainable parameter and its offset in the model's flat vector: every array of the
    plain state dict, sorted by name (:mod:`medfed.secagg.update`'s order)."""
    from medfed.models.checkpoint import plain_state_dict

    sizes = {name: int(tensor.numel()) for name, tensor in plain_state_dict(model).items()}
    offsets: dict[str, int] = {}
    offset = 0
    for name in sorted(sizes):
        offsets[name] = offset
        offset += sizes[name]
    if offset != dim:
        raise PolicyError(
            f"the site's network has {offset} values, the global model {dim}",
            hint="the run's model settings must build the global model's network",
        )
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    others = sorted(set(sizes) - {name for name, _p in trainable})
    if others:
        # the aggregator adds the noisy step to every value of the global model
        raise PolicyError(
            f"distributed noise needs a network whose every value is trained; {others[:3]} are not",
            hint="use a network without buffers or frozen layers (medfed's unet and "
            "attention_unet have none)",
        )
    return [(p, offsets[name]) for name, p in trainable]
