"""A run's choice of aggregation strategy and its settings (the arithmetic is the aggregator's:
:mod:`medfed.aggregator.strategies`)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["fedavg", "fedprox", "fedadam", "median", "trimmed_mean"]


class StrategySettings(BaseModel):
    """The researcher's choice of strategy and its settings (unknown keys are refused).

    Settings of strategies other than ``name`` are ignored, except ``proximal_mu``, which is
    refused outside FedProx because sites would otherwise apply it silently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrategyName = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0.0, description="FedProx term, applied at sites.")
    server_lr: float = Field(default=1e-2, gt=0.0, description="FedAdam server learning rate.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="FedAdam first-moment decay.")
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0, description="FedAdam second-moment decay.")
    tau: float = Field(default=1e-3, gt=0.0, description="FedAdam adaptivity (denominator floor).")
    trim_fraction: float = Field(
        default=0.1, ge=0.0, lt=0.5, description="Share trimmed at each end (trimmed_mean)."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("fedprox needs proximal_mu > 0 (with 0 it is fedavg), e.g. 0.01")
        if self.name != "fedprox" and self.proximal_mu != 0:
            raise ValueError(f"proximal_mu only applies to fedprox, not {self.name}")
        return self

    def site_settings(self) -> dict[str, float]:
        """Settings the sites must apply during local training (sent with each round)."""
        return {"proximal_mu": self.proximal_mu} if self.name == "fedprox" else {}
