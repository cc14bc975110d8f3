"""A complete synthetic federation on this machine: workspace, non-IID sites, run settings.

Used by `medfed demo`, by the in-process runner in notebooks and by the tests. Each site gets
its own synthetic patients (a different intensity shift per site, so the data is non-IID), a
configuration that uses its provisioning kit (TLS CA, node key, ledger key), and the run's
noise multiplier is planned so that the whole run spends 90% of the sites' cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.config.run import RunSettings
from medfed.errors import ConfigError
from medfed.transport.provision import SUPERLINK_PORT, Workspace

DEMO_CAP = 8.0
DEMO_DELTA = 1e-5
BATCH_SIZE = 4
# Share of the cap one planned run may spend: a re-run or a retried round still fits.
PLANNED_SHARE = 0.9


@dataclass(frozen=True)
class DemoSetup:
    """Everything a synthetic federation needs, on disk."""

    root: Path
    workspace: Workspace
    site_configs: dict[str, Path]
    settings: RunSettings
    train_patients: dict[str, int]


def site_names(count: int) -> list[str]:
    if count < 1 or count > 26:
        raise ConfigError(f"--sites must be between 1 and 26, not {count}")
    return [f"site-{chr(ord('a') + index)}" for index in range(count)]


def planned_noise(
    *, train_patients: Sequence[int], epochs: int, cap: float = DEMO_CAP, delta: float = DEMO_DELTA
) -> float:
    """Noise with which ``epochs`` epochs at every site spend at most 90% of ``cap``.

    The smallest site has the highest sampling rate and so the highest epsilon; planning for
    it keeps every site within the cap. Rounded up to 0.01 (more noise, less epsilon).
    """
    from medfed.privacy import noise_for_target_epsilon, plan_sampling

    plan = plan_sampling(dataset_size=min(train_patients), batch_size=BATCH_SIZE, epochs=epochs)
    noise = noise_for_target_epsilon(
        target_epsilon=PLANNED_SHARE * cap,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=delta,
        accountant="rdp",
    )
    return math.ceil(noise * 100) / 100


def prepare_federation(
    *,
    root: Path,
    sites: int = 3,
    cases: int = 30,
    size: int = 32,
    rounds: int = 3,
    local_epochs: int = 5,
    seed: int = 0,
    port: int | None = None,
    run_name: str = "demo",
    min_sites: int | None = None,
) -> DemoSetup:
    """Provision a workspace under ``root`` and write one synthetic site per name."""
    from medfed.config.loading import dump_site_config, load_site_config
    from medfed.config.site import TransportSection
    from medfed.data.synth import synthesize_site
    from medfed.transport.provision import provision_workspace

    root = Path(root).absolute()
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"{root} is not empty", hint="choose a new --workspace directory, or delete this one"
        )
    names = site_names(sites)
    workspace = provision_workspace(
        out=root / "workspace", sites=names, host="127.0.0.1", port=port or SUPERLINK_PORT
    )
    configs: dict[str, Path] = {}
    train_patients: dict[str, int] = {}
    for index, name in enumerate(names):
        site_dir = root / "sites" / name
        # Spread the sites' intensity shifts over [-0.5, 0.5]: non-IID but learnable together.
        shift = 0.0 if sites == 1 else -0.5 + index / (sites - 1)
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
        data["privacy"]["epsilon_cap"] = DEMO_CAP
        data["privacy"]["delta"] = DEMO_DELTA
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
        train_patients[name] = result.n_train
    noise = planned_noise(
        train_patients=list(train_patients.values()), epochs=rounds * local_epochs
    )
    settings = RunSettings(
        run_name=run_name,
        rounds=rounds,
        local_epochs=local_epochs,
        noise_multiplier=noise,
        min_sites=min(sites, 2) if min_sites is None else min_sites,
        sites=names,
        seed=seed,
    )
    return DemoSetup(
        root=root,
        workspace=workspace,
        site_configs=configs,
        settings=settings,
        train_patients=train_patients,
    )
