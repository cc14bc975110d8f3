"""A run's choice of aggregation strategy and its settings (the arithmetic is the aggregator's:
:mod:`medfed.aggregator.strategies`), site-level central DP on top of it
(:mod:`medfed.aggregator.central_dp`), and the named presets that expand to measured settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["fedavg", "fedprox", "fedadam", "median", "trimmed_mean"]
PresetName = Literal["dp-fedadam-one-step", "dp-fedadam-cosine"]
#: Strategies whose result is a weighted mean: the only ones central DP can bound.
MEAN_STRATEGIES: Final = ("fedavg", "fedprox", "fedadam")


class CentralDPSettings(BaseModel):
    """Site-level DP at the aggregator (DP-FedAvg, McMahan et al. 2018).

    Each site's update, as a delta from the round's global model, is clipped to L2 norm
    ``clip_norm``; the clipped deltas are averaged with equal weights over the round's cohort
    and Gaussian noise of standard deviation ``noise_multiplier * clip_norm / cohort`` is added
    to the mean. The unit protected is a whole site (all its patients at once), under
    add/remove-one-site (zero-out) adjacency; the epsilon is reported as *site-level* and never
    mixed with the patient-level epsilons of the sites' ledgers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float = Field(
        gt=0, description="Noise standard deviation over the clip norm, on the sum of deltas."
    )
    clip_norm: float = Field(gt=0, description="L2 bound of each site's update (delta).")
    delta: float = Field(
        default=1e-5,
        gt=0,
        lt=1,
        description="Site-level delta; must be below 1 / number of sites.",
    )


class EmaSettings(BaseModel):
    """An exponential moving average of the global models over rounds, released as the final
    model (Polyak averaging): ``ema_1 = w_1``, ``ema_t = decay * ema_(t-1) + (1 - decay) * w_t``.

    Post-processing of models already released, so it costs no privacy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    decay: float = Field(gt=0, lt=1, description="Weight of the average so far at each round.")


class StrategySettings(BaseModel):
    """The researcher's choice of strategy and its settings (unknown keys are refused).

    Settings of strategies other than ``name`` are ignored, except ``proximal_mu``, which is
    refused outside FedProx because sites would otherwise apply it silently. ``preset`` fills
    in the strategy settings of a named recipe (:data:`PRESETS`); keys given beside it win.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: PresetName | None = Field(
        default=None, description="A named recipe; see medfed.config.strategy.PRESETS."
    )
    name: StrategyName = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0.0, description="FedProx term, applied at sites.")
    server_lr: float = Field(default=1e-2, gt=0.0, description="FedAdam server learning rate.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="FedAdam first-moment decay.")
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0, description="FedAdam second-moment decay.")
    tau: float = Field(default=1e-3, gt=0.0, description="FedAdam adaptivity (denominator floor).")
    server_lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="FedAdam's server rate over the run: constant, or a cosine decay from "
        "server_lr at round 1 to server_lr_final x server_lr at the run's last round.",
    )
    server_lr_final: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="cosine: the server rate at the run's last round, as a share of server_lr.",
    )
    trim_fraction: float = Field(
        default=0.1, ge=0.0, lt=0.5, description="Share trimmed at each end (trimmed_mean)."
    )
    central_dp: CentralDPSettings | None = Field(
        default=None, description="Site-level DP at the aggregator; null: none."
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("preset") is None:
            return data
        preset = PRESETS.get(str(data["preset"]))
        if preset is None:
            return data  # the field's own check names the known presets
        return {**preset.strategy, **data}

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0 (with 0 it is fedavg), e.g. 0.01")
        if self.name != "fedprox" and self.proximal_mu != 0:
            raise ValueError(f"proximal_mu only applies to fedprox, not {self.name}")
        if self.server_lr_schedule != "constant" and self.name != "fedadam":
            raise ValueError(
                f"server_lr_schedule only applies to fedadam (the server rate), not {self.name}"
            )
        if self.preset is not None and self.name != PRESETS[self.preset].strategy["name"]:
            raise ValueError(
                f"preset {self.preset} is a {PRESETS[self.preset].strategy['name']} recipe; "
                f"drop name {self.name} or the preset"
            )
        if self.central_dp is not None and self.name not in MEAN_STRATEGIES:
            raise ValueError(
                f"central_dp cannot be combined with {self.name}: its noise is sized for one "
                "site's share of a mean, and an order statistic (median, trimmed mean) can move "
                f"by more than that; use one of {', '.join(MEAN_STRATEGIES)}"
            )
        return self

    def server_lr_at(self, *, round: int, rounds: int) -> float:
        """FedAdam's server rate at ``round`` (1-based) of a run of ``rounds``.

        The cosine schedule is the one of Loshchilov and Hutter (2017, "SGDR") without restarts,
        ending at ``server_lr_final`` of the rate instead of 0: with DP noise in every
        pseudo-gradient, the last steps' noise lands in the released model in proportion to the
        rate, so a smaller rate at the end keeps less of it. It depends on the round alone, so a
        resumed run continues on the same curve.
        """
        if self.server_lr_schedule == "constant" or rounds <= 1:
            return self.server_lr
        progress = min(max(round - 1, 0) / (rounds - 1), 1.0)
        final = self.server_lr_final
        return self.server_lr * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def site_settings(self) -> dict[str, float]:
        """Settings the sites must apply during local training (sent with each round)."""
        return {"proximal_mu": self.proximal_mu} if self.name == "fedprox" else {}


class Preset(BaseModel):
    """A named recipe: its strategy settings, the run settings it implies, and what each site
    must set in its own config (a run cannot set those), with where the numbers come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Mapping[str, Any]
    run: Mapping[str, Any]
    site: Mapping[str, str]
    source: str


#: What each site of a one-step recipe sets: one full-batch plain SGD step per round.
_ONE_FULL_BATCH_SGD_STEP: Final = {
    "training.optimizer": "sgd",
    "training.batch_size": "at least the site's training patients (sample rate 1)",
}
_ONE_STEP_FEDADAM: Final = {
    "name": "fedadam",
    "server_lr": 0.05,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
}

PRESETS: Final[Mapping[str, Preset]] = {
    "dp-fedadam-one-step": Preset(
        # benchmarks/README.md, "Utility", row 16 of "How the settings were found" (the
        # benchmark's defaults): 80 rounds of one full-batch DP-SGD step with plain SGD at
        # rate 1.0 and clip 0.5 at each site, FedAdam at server rate 0.05 on the aggregate.
        strategy=_ONE_STEP_FEDADAM,
        run={"rounds": 80, "local_epochs": 1, "learning_rate": 1.0, "max_grad_norm": 0.5},
        site=_ONE_FULL_BATCH_SGD_STEP,
        source="benchmarks/README.md, Utility: federated DP / centralised Dice 0.68-0.85 "
        "(mean 0.79 over 11 runs) at epsilon 8, 3 sites x 19 training patients at 32^3",
    ),
    "dp-fedadam-cosine": Preset(
        # benchmarks/README.md, "Utility", "A server rate schedule": the one-step recipe with
        # FedAdam's server rate decaying along a cosine to a tenth of itself, over 160 rounds
        # (the schedule lets more, noisier rounds help, where a constant rate lost at 120).
        strategy={
            **_ONE_STEP_FEDADAM,
            "server_lr_schedule": "cosine",
            "server_lr_final": 0.1,
        },
        run={"rounds": 160, "local_epochs": 1, "learning_rate": 1.0, "max_grad_norm": 0.5},
        site=_ONE_FULL_BATCH_SGD_STEP,
        source="benchmarks/README.md, Utility: federated DP / centralised Dice 0.73-0.89 "
        "(mean 0.845 over 6 runs) at epsilon 8, 3 sites x 19 training patients at 32^3",
    ),
}


def with_preset_run_settings(data: Any) -> Any:
    """``data`` (a run's settings, unvalidated) with its strategy preset's run settings filled
    in where ``data`` leaves them out or null: a value the run names itself wins."""
    if not isinstance(data, Mapping):
        return data
    strategy = data.get("strategy")
    if isinstance(strategy, StrategySettings):
        name = strategy.preset
    elif isinstance(strategy, Mapping):
        name = strategy.get("preset")
    else:
        return data
    preset = PRESETS.get(str(name)) if name is not None else None
    if preset is None:
        return data
    # a key left out, or null ("each site's"), takes the preset's value
    return {**data, **{k: v for k, v in preset.run.items() if data.get(k) is None}}
