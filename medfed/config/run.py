"""A federation run's settings: what a researcher chooses (never code).

The settings travel to the aggregator's ServerApp as one JSON value in Flower's run config and,
in the parts sites need, to every site with each round. Unknown keys are refused everywhere, so
a misspelt setting is an error and not a silent default.
"""

from __future__ import annotations

import json
import re
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medfed.config.site import ModelSection
from medfed.config.strategy import EmaSettings, StrategySettings, with_preset_run_settings
from medfed.errors import ConfigError

RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# The key of Flower's run config that carries these settings as JSON.
RUN_CONFIG_KEY = "settings"


class DistributedNoiseSettings(BaseModel):
    """Distributed noise (Kairouz, Liu, Steinke 2021): each site adds a share of the noise.

    Needs secure aggregation and one local epoch (one full-batch step per round). ``sites`` is
    the number of shares the sum's noise is split into: each site adds ``1 / sqrt(sites)`` of it,
    and a round whose sum holds fewer sites' inputs is abandoned by the sites themselves.
    ``count_share`` weights the masked patient count against one patient's gradient bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sites: int = Field(ge=2, le=10_000)
    count_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="The count coordinate's weight as a share of a patient's gradient bound: "
        "the sensitivity grows by sqrt(1 + share^2), the count's noise is 1/share the "
        "gradient's.",
    )


class RunSettings(BaseModel):
    """Everything a federation run is configured by.

    ``noise_multiplier`` and ``max_grad_norm`` left unset mean "each site's own setting"; when
    set, each site still checks them against its policy and its cap before training.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str = Field(
        pattern=RUN_NAME_PATTERN.pattern,
        description="Stable name of the run: its output directory, ledger run id, resume key.",
    )
    project: str = Field(
        default="default",
        pattern=RUN_NAME_PATTERN.pattern,
        description="The study this run belongs to; sites accept runs by project and name.",
    )
    rounds: int = Field(default=3, ge=1, le=1000)
    local_epochs: int = Field(default=2, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0, description="Null: each site's.")
    model: ModelSection = ModelSection()
    strategy: StrategySettings = StrategySettings()
    noise_multiplier: float | None = Field(default=None, gt=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    min_sites: int = Field(
        default=2, ge=1, description="Successful sites a round needs; fewer ends the run."
    )
    sites: list[str] | None = Field(
        default=None, description="Sites to train with (null: every registered site online)."
    )
    wait_for_sites_s: float = Field(
        default=120.0, gt=0, description="How long to wait for min_sites to come online."
    )
    round_timeout_s: float = Field(
        default=900.0, gt=0, description="A site that has not answered by then is left out."
    )
    seed: int = Field(default=0, description="Seed of the initial global model.")
    secure_aggregation: bool = Field(
        default=False,
        description="Pairwise-masked uploads: the aggregator learns only the sum of the "
        "sites' weighted updates (weighted-mean strategies only).",
    )
    secure_aggregation_bound: float = Field(
        default=1.0,
        gt=0,
        description="Secure aggregation: each coordinate of a site's weight change is clipped "
        "to +-this before encoding (the bound that rules out wrap-around).",
    )
    secure_aggregation_max_weight: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Secure aggregation: the largest patient count a site's update is weighted by.",
    )
    distributed_noise: DistributedNoiseSettings | None = Field(
        default=None,
        description="Each site adds only its share of the noise, trusting secure aggregation "
        "and the other sites (a site's policy must allow it); null: each site adds all of it.",
    )
    resume: bool = Field(
        default=False, description="Continue the run of this name from its last checkpoint."
    )
    ema: EmaSettings | None = Field(
        default=None, description="Release a moving average of the global models; null: none."
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        # strategy.preset also implies run settings (rounds, local epochs...): filled in here.
        return with_preset_run_settings(data)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.strategy.name in ("median", "trimmed_mean") and self.min_sites < 3:
            raise ValueError(f"strategy {self.strategy.name} needs min_sites of at least 3")
        if self.sites is not None and len(self.sites) < self.min_sites:
            raise ValueError(f"{len(self.sites)} sites listed but min_sites is {self.min_sites}")
        if self.distributed_noise is not None:
            self._check_distributed(self.distributed_noise)
        return self

    def _check_distributed(self, noise: DistributedNoiseSettings) -> None:
        if not self.secure_aggregation:
            raise ValueError(
                "distributed_noise needs secure_aggregation: without it the aggregator sees "
                "each site's share of the noise alone"
            )
        if self.local_epochs != 1:
            raise ValueError(
                f"distributed_noise takes one full-batch step per round: set local_epochs to 1, "
                f"not {self.local_epochs}"
            )
        if self.min_sites < noise.sites:
            raise ValueError(
                f"distributed_noise counts on {noise.sites} sites' shares but min_sites is "
                f"{self.min_sites}: set min_sites to at least {noise.sites}"
            )
        if self.strategy.central_dp is not None:
            raise ValueError("distributed_noise and strategy.central_dp cannot be combined")
        if self.max_grad_norm is None or self.learning_rate is None:
            raise ValueError(
                "distributed_noise needs max_grad_norm and learning_rate set in the run: the "
                "sites round to a grid sized by the clip, and the aggregator takes the step"
            )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, source: str = "run settings") -> RunSettings:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        return parse_run_settings(data, source=source)


def parse_run_settings(data: Any, *, source: str = "run settings") -> RunSettings:
    """Validate ``data``; every problem is reported in one :class:`ConfigError`."""
    try:
        return RunSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(
            f"{source}: {problems}",
            hint="see `medfed run --help` for the settings and their ranges",
        ) from None
