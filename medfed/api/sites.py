"""Synthetic sites for a study on one machine: NIfTI data, manifests, site configs, a workspace.

A federation needs more than data: each site signs its privacy ledger with a key registered at
the aggregator and is recognised by its node key, so the sites are written together with a
provisioned workspace (:func:`medfed.transport.provision.provision_workspace`) whose kits those
configs use. ``medfed demo`` and the notebooks build their federations here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.errors import ConfigError
from medfed.transport.provision import SUPERLINK_PORT
from medfed.workspace import Workspace

if TYPE_CHECKING:
    from medfed.config.site import SiteConfig

DEFAULT_CAP = 8.0
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class SyntheticSites:
    """Synthetic sites on disk and the workspace that registers them.

    ``site_configs`` maps each site id to its ``site.yaml``; ``train_patients`` is each site's
    number of training patients (the ``dataset_size`` of :func:`medfed.plan_noise`).
    """

    root: Path
    workspace: Workspace
    site_configs: Mapping[str, Path]
    train_patients: Mapping[str, int]

    @property
    def sites(self) -> list[str]:
        return sorted(self.site_configs)

    def config(self, site_id: str) -> SiteConfig:
        """The validated configuration of one site (paths absolute)."""
        from medfed.config.loading import load_site_config

        if site_id not in self.site_configs:
            raise ConfigError(
                f"no synthetic site {site_id!r}", hint=f"sites: {', '.join(self.sites)}"
            )
        return load_site_config(self.site_configs[site_id])


def site_names(count: int) -> list[str]:
    """``site-a``, ``site-b``, ... for ``count`` sites (1 to 26)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 26:
        raise ConfigError(
            f"the number of sites must be between 1 and 26, not {count!r}",
            hint="use --sites 3 (or sites=3)",
        )
    return [f"site-{chr(ord('a') + index)}" for index in range(count)]


def make_synthetic_sites(
    *,
    root: Path | str,
    sites: int = 3,
    cases: int = 24,
    size: int = 32,
    seed: int = 0,
    non_iid: bool = True,
    epsilon_cap: float = DEFAULT_CAP,
    delta: float = DEFAULT_DELTA,
    port: int | None = None,
    training: Mapping[str, Any] | None = None,
    full_batch: bool = False,
    policy: Mapping[str, Any] | None = None,
) -> SyntheticSites:
    """Write ``sites`` synthetic sites and a workspace for them under ``root`` (new or empty).

    Each site gets ``cases`` patients of about ``size``\\ ^3 voxels (about 20% of them for
    validation), a ``site.yaml`` that uses its provisioning kit (TLS CA, node key, ledger key)
    and the lifetime cap ``epsilon_cap`` at ``delta``. With ``non_iid`` the sites' intensity
    scales, contrasts and lesion sizes differ (spread evenly between the extremes); without
    it they share one acquisition style and differ only in their patients. The same arguments
    give the same data byte for byte under any ``root``, so several studies can compare
    settings on identical sites, each with a fresh privacy budget.

    ``training`` overrides keys of every site's ``training`` section (``optimizer``,
    ``learning_rate``, ...); ``full_batch`` sets each site's batch size to its number of
    training patients, so that every DP step samples each patient with probability 1 (few,
    large, noisier steps: what DP-SGD on small sites does best, see benchmarks/README.md).
    ``policy`` overrides keys of every site's ``policy`` section (``distributed_noise``, ...).
    """
    from pydantic import ValidationError

    from medfed.config.loading import dump_site_config, format_validation_error, load_site_config
    from medfed.config.site import PolicySection, TrainingSection, TransportSection
    from medfed.data.synth import MIN_CASES, MIN_SIZE, synthesize_site
    from medfed.privacy.accounting import check_delta
    from medfed.site.release import released_counts
    from medfed.transport.provision import provision_workspace

    names = site_names(sites)
    # Checked before anything is written: a half-built study directory helps nobody.
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < MIN_CASES:
        raise ConfigError(
            f"cases must be an integer of at least {MIN_CASES}, not {cases!r}",
            hint="each site needs training and validation patients",
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ConfigError(f"size must be an integer of at least {MIN_SIZE}, not {size!r}")
    if not isinstance(epsilon_cap, int | float) or not 0 < epsilon_cap < float("inf"):
        raise ConfigError(f"epsilon_cap must be a finite number > 0, not {epsilon_cap!r}")
    check_delta(delta)
    for section, model, overrides in (
        ("training", TrainingSection, training),
        ("policy", PolicySection, policy),
    ):
        try:
            model.model_validate(overrides or {})
        except ValidationError as exc:
            problems = format_validation_error(Path(section), exc).replace("\n", "; ")
            hint = "see sites/site.example.yaml for the settings"
            raise ConfigError(problems, hint=hint) from None
    root = Path(root).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            f"{root} is not an empty directory",
            hint="choose a new directory (`medfed demo --workspace`), or replace an earlier "
            "demo with `medfed demo --force`",
        )
    workspace = provision_workspace(
        out=root / "workspace", sites=names, host="127.0.0.1", port=port or SUPERLINK_PORT
    )
    configs: dict[str, Path] = {}
    train_patients: dict[str, int] = {}
    for index, name in enumerate(names):
        site_dir = root / "sites" / name
        # Shifts spread over [-0.5, 0.5]: different enough to be non-IID, close enough that
        # one model can serve every site.
        shift = -0.5 + index / (sites - 1) if non_iid and sites > 1 else 0.0
        result = synthesize_site(
            out=site_dir / "data",
            cases=cases,
            size=size,
            seed=seed + 101 * index,
            site_shift=shift,
            site_id=name,
        )
        base = load_site_config(result.config)
        kit = workspace.root / workspace.site(name).kit
        data = base.model_dump()
        data["paths"]["workdir"] = site_dir / "work"
        data["paths"]["signing_key"] = kit / "ledger_key.pem"
        # The sites share this machine's cores: one thread each, fewer when they outnumber them.
        data["training"]["threads"] = max(1, (os.cpu_count() or 1) // sites)
        data["training"].update(training or {})
        if full_batch:
            data["training"]["batch_size"] = result.n_train
        data["privacy"]["epsilon_cap"] = epsilon_cap
        data["privacy"]["delta"] = delta
        # A study on synthetic sites plans whole runs against the cap, so one round may spend
        # all of it; a hospital's `medfed site init` keeps the default of a quarter.
        data["policy"]["max_epsilon_per_round"] = epsilon_cap
        data["policy"].update(policy or {})
        data["transport"] = TransportSection(
            superlink_address=workspace.manifest.address,
            root_certificates=kit / "ca.crt",
            node_private_key=kit / "node_key",
            node_public_key=kit / "node_key.pub",
        ).model_dump()
        config = type(base).model_validate(data)
        path = site_dir / "site.yaml"
        dump_site_config(config, path)
        configs[name] = path
        # The site releases its (noisy) patient counts now, as it would at its first round:
        # runs are planned from them, exactly as the sites will plan their steps.
        counts = released_counts(config=load_site_config(path), run_id="onboarding")
        train_patients[name] = counts.train
    return SyntheticSites(
        root=root, workspace=workspace, site_configs=configs, train_patients=train_patients
    )
