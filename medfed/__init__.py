"""medfed: privacy-preserving federated medical image segmentation.

The researcher's API, in the order of a study::

    import medfed

    sites = medfed.make_synthetic_sites(root="study", sites=3, cases=24)
    noise = medfed.plan_noise(dataset_size=min(sites.train_patients.values()), batch_size=4,
                              epochs_per_round=2, rounds=3, target_epsilon=8.0, delta=1e-5)
    settings = medfed.RunSettings(run_name="study-1", rounds=3, local_epochs=2,
                                  noise_multiplier=noise)
    results = medfed.run_federation(sites=sites, settings=settings)
    results.history          # pandas: round, site, loss, dice, epsilon, ...
    results.mlflow_run_id

Names are imported on first use, so ``import medfed`` loads neither torch, Flower nor MLflow.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from medfed.errors import MedfedError

__version__ = "0.1.0"

# Importing mlflow starts a client that reports usage to an outside host; medfed sends nothing
# off the machine that the user did not name (a tracking server they chose). A user who wants
# it sets the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    "RunSettings": "medfed.config.run",
    "SiteConfig": "medfed.config.site",
    "load_site_config": "medfed.config.loading",
    "SyntheticSites": "medfed.api.sites",
    "make_synthetic_sites": "medfed.api.sites",
    "plan_noise": "medfed.api.planner",
    "plan_epsilon": "medfed.api.planner",
    "run_federation": "medfed.api.running",
    "submit_run": "medfed.api.running",
    "SubmittedRun": "medfed.api.running",
    "start_local_deployment": "medfed.api.running",
    "LocalDeployment": "medfed.api.running",
    "FederationResults": "medfed.api.results",
    "load_results": "medfed.api.results",
    "verify_workspace": "medfed.audit.verify",
    "build_report": "medfed.audit.report",
}

__all__ = [
    "FederationResults",
    "LocalDeployment",
    "MedfedError",
    "RunSettings",
    "SiteConfig",
    "SubmittedRun",
    "SyntheticSites",
    "__version__",
    "build_report",
    "load_results",
    "load_site_config",
    "make_synthetic_sites",
    "plan_epsilon",
    "plan_noise",
    "run_federation",
    "start_local_deployment",
    "submit_run",
    "verify_workspace",
]

if TYPE_CHECKING:
    from medfed.api.planner import plan_epsilon, plan_noise
    from medfed.api.results import FederationResults, load_results
    from medfed.api.running import (
        LocalDeployment,
        SubmittedRun,
        run_federation,
        start_local_deployment,
        submit_run,
    )
    from medfed.api.sites import SyntheticSites, make_synthetic_sites
    from medfed.audit.report import build_report
    from medfed.audit.verify import verify_workspace
    from medfed.config.loading import load_site_config
    from medfed.config.run import RunSettings
    from medfed.config.site import SiteConfig


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medfed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
