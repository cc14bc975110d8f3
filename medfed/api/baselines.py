"""Non-private research baselines: centralised training on pooled data, and FedAvg without DP.

These answer "what does privacy cost?" on data where that question may be asked (synthetic or
public sets): the Dice of a federated DP model is only meaningful next to what the same network
reaches without DP. They are not a way to train on real patients: nothing here writes a site
ledger, goes through Flower or checks a site's policy, and nothing here is private.

Both baselines reuse the DP trainer's parts, so the comparison differs only in privacy: the data
pipeline (:func:`medfed.data.build_datasets`, one random crop per patient per draw, the
manifest's validation split), the network (:func:`medfed.site.trainer.build_site_model`), the
optimiser, the loss (:func:`medfed.site.dp.segmentation_loss`) and the validation Dice
(:func:`medfed.site.trainer.validation_dice`). Scores are means over each site's validation
patients, weighted by their number, as the federation's final Dice is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.aggregator.outcome import weighted_mean
from medfed.config.run import RunSettings
from medfed.config.site import SiteConfig
from medfed.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medfed.data import SiteDatasets

__all__ = [
    "BaselineResult",
    "BaselineStep",
    "train_centralised",
    "train_federated_nonprivate",
]


@dataclass(frozen=True)
class BaselineStep:
    """The state after one epoch (centralised) or one round (federated), counted from 1.

    ``loss`` is the mean training loss of the epoch (of the round's last local epoch, averaged
    over sites by training patients); ``dice`` and ``dice_per_site`` are validation scores.
    """

    index: int
    loss: float
    dice: float
    dice_per_site: Mapping[str, float]


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's final validation Dice, per site and overall, and its curve."""

    dice: float
    dice_per_site: Mapping[str, float]
    history: tuple[BaselineStep, ...]
    seconds: float


@dataclass(frozen=True)
class _Site:
    config: SiteConfig
    datasets: SiteDatasets


def train_centralised(
    *,
    site_configs: Sequence[SiteConfig],
    epochs: int,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> BaselineResult:
    """Train one network without DP on all sites' training patients pooled; score it per site.

    The network, optimiser, device and (unless given) learning rate and batch size are those of
    the first site's configuration; every site must describe the same network, classes and patch
    size. An epoch visits every pooled training patient once, in shuffled mini-batches of
    ``batch_size`` patients, one crop each. ``seed`` fixes the initial weights, the order and
    the crops: with ``threads=1`` two calls give identical results.
    """
    import torch

    from medfed.models import resolve_device
    from medfed.site.epochs import make_optimizer
    from medfed.site.trainer import build_site_model

    started = time.monotonic()
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    sites = _load_sites(site_configs)
    first = sites[0].config
    training = first.training.model_copy(
        update={
            "seed": seed,
            "learning_rate": learning_rate or first.training.learning_rate,
            "batch_size": batch_size or first.training.batch_size,
        }
    )
    if training.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {training.batch_size}")
    config = first.model_copy(update={"training": training})
    device = resolve_device(
        name=config.training.device, threads=threads if threads is not None else training.threads
    )
    model, _ = build_site_model(config=config, device=device)
    optimizer = make_optimizer(config=config, model=model)
    pooled = [(site, index) for site in sites for index in range(len(site.datasets.train))]
    generator = torch.Generator().manual_seed(seed)
    history: list[BaselineStep] = []
    for epoch in range(1, epochs + 1):
        for number, site in enumerate(sites):
            # distinct, reproducible crops per site and epoch
            site.datasets.train.set_random_state(seed + epoch * len(sites) + number)
        order = torch.randperm(len(pooled), generator=generator).tolist()
        batches = [
            [pooled[i] for i in order[start : start + training.batch_size]]
            for start in range(0, len(order), training.batch_size)
        ]
        loss = _train_batches(
            model=model, optimizer=optimizer, batches=batches, device=device, epoch=epoch
        )
        dice, per_site = _evaluate(model=model, sites=sites, device=device)
        history.append(BaselineStep(index=epoch, loss=loss, dice=dice, dice_per_site=per_site))
    return _result(history, started)


def train_federated_nonprivate(
    *,
    site_configs: Sequence[SiteConfig],
    settings: RunSettings,
    threads: int | None = None,
) -> BaselineResult:
    """Federated training as ``settings`` describe it, with plain local training instead of DP.

    The run's model, rounds, local epochs, learning rate and strategy (FedAvg, FedProx's
    proximal term, FedAdam, median, trimmed mean: :func:`medfed.aggregator.strategies.aggregate`)
    apply as in a real run; its noise and clipping settings do not, since nothing is private.
    Every site trains in every round, from the global model seeded with ``settings.seed``; an
    epoch visits each of its training patients once, in shuffled mini-batches of the site's
    ``training.batch_size``. After each round the global model is scored on every site's
    validation patients. With ``threads=1`` two calls give identical results.
    """
    import torch

    from medfed.aggregator.strategies import FedAdamState, aggregate
    from medfed.models import build_model, resolve_device, spec_from_config
    from medfed.models.checkpoint import model_weights
    from medfed.site.epochs import make_optimizer
    from medfed.site.trainer import build_site_model
    from medfed.types import SiteUpdate

    started = time.monotonic()
    sites = _load_sites([_apply_run(config, settings) for config in site_configs])
    first = sites[0].config
    device = resolve_device(
        name=first.training.device,
        threads=threads if threads is not None else first.training.threads,
    )
    # The federation's starting model: seeded with the run's seed, as a site's INIT reply is.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        global_weights = model_weights(build_model(spec=spec_from_config(first)))
    mu = settings.strategy.proximal_mu if settings.strategy.name == "fedprox" else 0.0
    state: FedAdamState | None = None
    history: list[BaselineStep] = []
    model: nn.Module | None = None
    for round_index in range(1, settings.rounds + 1):
        updates = []
        losses: dict[str, tuple[float, int]] = {}
        for site in sites:
            config = site.config
            model, _ = build_site_model(
                config=config, device=device, initial_weights=global_weights
            )
            optimizer = make_optimizer(config=config, model=model)
            anchors = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
            train = site.datasets.train
            # as the DP trainer does: a different, reproducible crop sequence each round
            train.set_random_state(config.training.seed + round_index)
            generator = torch.Generator().manual_seed(config.training.seed + round_index)
            loss = math.nan
            for epoch in range(1, settings.local_epochs + 1):
                order = torch.randperm(len(train), generator=generator).tolist()
                size = config.training.batch_size
                batches = [
                    [(site, i) for i in order[start : start + size]]
                    for start in range(0, len(order), size)
                ]
                loss = _train_batches(
                    model=model,
                    optimizer=optimizer,
                    batches=batches,
                    device=device,
                    epoch=epoch,
                    proximal=None if anchors is None else _proximal(model, anchors, mu),
                )
            losses[config.site_id] = (loss, len(train))
            updates.append(
                SiteUpdate(
                    site_id=config.site_id,
                    round=round_index,
                    weights=model_weights(model),
                    num_patients=len(train),
                )
            )
        result = aggregate(
            settings=settings.strategy, state=state, global_weights=global_weights, updates=updates
        )
        global_weights, state = dict(result.weights), result.state
        assert model is not None
        _load(model, global_weights)
        dice, per_site = _evaluate(model=model, sites=sites, device=device)
        history.append(
            BaselineStep(
                index=round_index, loss=weighted_mean(losses), dice=dice, dice_per_site=per_site
            )
        )
    return _result(history, started)


def _apply_run(config: SiteConfig, settings: RunSettings) -> SiteConfig:
    """The site's configuration with the run's model, epochs and learning rate applied."""
    training = config.training.model_copy(
        update={
            "epochs": settings.local_epochs,
            "learning_rate": settings.learning_rate or config.training.learning_rate,
        }
    )
    data = config.model_dump()
    data["model"] = settings.model.model_dump()
    data["training"] = training.model_dump()
    try:
        return SiteConfig.model_validate(data)
    except ValueError as exc:
        raise ConfigError(
            f"the run's settings do not fit site {config.site_id}: {exc}",
            hint="the run's model must fit the site's data.patch_size",
        ) from None


def _load_sites(site_configs: Sequence[SiteConfig]) -> list[_Site]:
    from medfed.data import build_datasets

    if not site_configs:
        raise ConfigError("a baseline needs at least one site configuration")
    ids = [config.site_id for config in site_configs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"site ids repeat: {ids}", hint="give each site configuration once")
    first = site_configs[0]
    for config in site_configs[1:]:
        differs = [
            name
            for name, a, b in (
                ("data.classes", config.data.classes, first.data.classes),
                ("data.patch_size", config.data.patch_size, first.data.patch_size),
                ("model", config.model, first.model),
            )
            if a != b
        ]
        if differs:
            raise ConfigError(
                f"site {config.site_id} differs from site {first.site_id} in {', '.join(differs)}",
                hint="a baseline trains one network for every site: the sites must agree",
            )
    # No disk cache: a baseline writes nothing into a site's working directory.
    return [_Site(config=c, datasets=build_datasets(c, disk_cache=False)) for c in site_configs]


def _train_batches(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Sequence[tuple[_Site, int]]],
    device: torch.device,
    epoch: int,
    proximal: Callable[[], None] | None = None,
) -> float:
    """One epoch of plain mini-batch training with the DP trainer's loss; its mean loss."""
    import warnings

    from medfed.site.dp import segmentation_loss
    from medfed.site.epochs import collate_patients

    loss_fn = segmentation_loss(onehot_targets=False)
    model.train()
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Num foregrounds 0")
        for batch in batches:
            items = collate_patients(
                items=[site.datasets.train[i] for site, i in batch], device=device
            )
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(items["image"]), items["label"])
            loss.backward()
            if proximal is not None:
                proximal()
            optimizer.step()
            losses.append(float(loss.detach()))
    mean = sum(losses) / len(losses) if losses else math.nan
    if not math.isfinite(mean):
        raise TrainingError(
            f"baseline training diverged in epoch {epoch} (loss {mean})",
            hint="lower the learning rate",
        )
    return mean


def _proximal(model: nn.Module, anchors: list[Any], mu: float) -> Callable[[], None]:
    """FedProx: add ``mu * (w - w_global)`` to every gradient, as the DP trainer does."""

    def add() -> None:
        for param, anchor in zip(model.parameters(), anchors, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=mu)

    return add


def _load(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    from medfed.models.checkpoint import load_weights_into

    load_weights_into(model=model, weights=weights)


def _evaluate(
    *, model: nn.Module, sites: Sequence[_Site], device: torch.device
) -> tuple[float, dict[str, float]]:
    from medfed.site.trainer import validation_dice

    per_site = {
        site.config.site_id: validation_dice(
            model=model, config=site.config, dataset=site.datasets.val, device=device
        )
        for site in sites
    }
    weights = {s.config.site_id: (per_site[s.config.site_id], len(s.datasets.val)) for s in sites}
    return weighted_mean(weights), per_site


def _result(history: list[BaselineStep], started: float) -> BaselineResult:
    last = history[-1]
    return BaselineResult(
        dice=last.dice,
        dice_per_site=dict(last.dice_per_site),
        history=tuple(history),
        seconds=time.monotonic() - started,
    )
