"""Many virtual sites on disk for a simulation: one provisioned workspace, tiny data per site.

The workspace is the real one (:func:`medfed.transport.provision.provision_workspace`): every
virtual site has its node key, its ledger signing key and the aggregator's receipt key, so the
aggregator tells virtual sites apart exactly as it tells real ones apart, and their ledgers are
signed and verified as in a deployment. Layout under the simulation's root::

    workspace/                the aggregator's workspace (keys, ledger copies, runs, mlflow.db)
    sites/<site>/data/        the site's synthetic 2-D cases and manifest
    sites/<site>/work/        its workdir: privacy ledger, preprocessed-case cache
    sites/<site>/site.yaml    its configuration (paths into its kit in workspace/sites/<site>)
    simulation.json           what was made: data shape, the sites in partition order

Writing the sites is the slow part of a simulation's first run (provisioning fsyncs every key
file); a later run on the same root reuses all of it, the sites' ledgers included: their privacy
budgets carry over, as a real site's would.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.errors import ConfigError
from medfed.workspace import SiteEntry, Workspace

SIMULATION_FILE: Final = "simulation.json"
MAX_SITES: Final = 99_999
# Every site gets the same cap; the run plans its noise to spend a small share of it, so that
# several runs fit on the same sites.
SITE_CAP: Final = 8.0
SITE_DELTA: Final = 1e-5
# The least noise a run may ask of a site (its policy's floor).
SITE_NOISE: Final = 0.5
# The reason the sites' released numbers may be exact (medfed.config.site.ReleaseSection).
SYNTHETIC_REASON: Final = "synthetic data of a medfed simulation: no real patients"


@dataclass(frozen=True)
class DataShape:
    """What every virtual site's synthetic dataset looks like (all sites alike)."""

    cases: int
    size: int
    seed: int


@dataclass(frozen=True)
class VirtualSites:
    """The virtual sites of a simulation, in partition order, and their workspace."""

    root: Path
    workspace: Workspace
    shape: DataShape
    configs: tuple[Path, ...]  # site.yaml of partition 0, 1, ...
    train_patients: int  # at the smallest site (its sampling rate is the highest)

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(site_id(index) for index in range(len(self.configs)))

    @property
    def mapping_file(self) -> Path:
        return self.root / SIMULATION_FILE


@dataclass(frozen=True)
class IndexedWorkspace(Workspace):
    """A workspace that finds a site by id or node key in a dictionary.

    :class:`Workspace` searches its manifest's list, and the aggregator asks for the site of
    every node it sees: over a thousand sites that is a million key comparisons per look at
    the grid. The answers are the same; a key not found as the exact bytes this index holds
    goes to :meth:`Workspace.site_for_node_key`, which compares the key's normalised form.
    """

    @functools.cached_property
    def _entries(self) -> dict[str, SiteEntry]:
        return {entry.site_id: entry for entry in self.manifest.sites}

    @functools.cached_property
    def _sites_by_key(self) -> dict[bytes, str]:
        return {self.node_public_key_pem(site): site for site in self._entries}

    def site(self, site_id: str) -> SiteEntry:
        entry = self._entries.get(site_id)
        return super().site(site_id) if entry is None else entry

    def site_for_node_key(self, pem: bytes) -> str | None:
        found = self._sites_by_key.get(bytes(pem))
        return super().site_for_node_key(pem) if found is None else found


def site_id(partition: int) -> str:
    """The id of the virtual site with Flower partition id ``partition``: ``site-00001``, ..."""
    return f"site-{partition + 1:05d}"


def prepare_sites(
    *, root: Path, sites: int, cases: int = 8, size: int = 16, seed: int = 0
) -> VirtualSites:
    """The first ``sites`` virtual sites under ``root``: made there, or reused from before.

    A root made earlier with at least as many sites and the same data shape is reused as it is;
    a root of another shape, or with fewer sites, is refused (a workspace cannot grow sites
    without new keys for all of them).
    """
    from medfed.data.synth import MIN_CASES, MIN_SIZE

    if not 1 <= sites <= MAX_SITES:
        raise ConfigError(f"--sites must be between 1 and {MAX_SITES}, not {sites}")
    if cases < max(MIN_CASES, 4):
        raise ConfigError(f"--cases must be at least 4 (training and validation), not {cases}")
    if size < MIN_SIZE or size % 2:
        raise ConfigError(f"--size must be an even number of at least {MIN_SIZE}, not {size}")
    root = Path(root).expanduser().absolute()
    shape = DataShape(cases=cases, size=size, seed=seed)
    made = _read_made(root)
    if made is None:
        _claim(root)
        made = _make(root, count=sites, shape=shape)
    _check_reusable(root, made, sites=sites, shape=shape)
    from medfed.workspace import load_workspace

    configs = tuple(Path(path) for path in made["configs"][:sites])
    loaded = load_workspace(root / "workspace")
    return VirtualSites(
        root=root,
        workspace=IndexedWorkspace(root=loaded.root, manifest=loaded.manifest),
        shape=shape,
        configs=configs,
        train_patients=int(made["train_patients"]),
    )


def _read_made(root: Path) -> dict[str, Any] | None:
    path = root / SIMULATION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read the simulation's record ({exc})",
            hint="use a new --workspace, or delete this directory",
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("configs"), list):
        raise ConfigError(f"{path}: not a medfed simulation record", hint="use a new --workspace")
    return data


def _claim(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            f"{root} is not empty and holds no medfed simulation ({SIMULATION_FILE})",
            hint="choose a new --workspace, or the one an earlier `medfed simulate` made",
        )


def _check_reusable(root: Path, made: dict[str, Any], *, sites: int, shape: DataShape) -> None:
    had = DataShape(cases=int(made["cases"]), size=int(made["size"]), seed=int(made["seed"]))
    if had != shape:
        raise ConfigError(
            f"{root} holds sites with {had.cases} cases of {had.size} pixels (seed {had.seed}), "
            f"not {shape.cases} of {shape.size} (seed {shape.seed})",
            hint=f"use --cases {had.cases} --size {had.size} there, or a new --workspace",
        )
    if len(made["configs"]) < sites:
        raise ConfigError(
            f"{root} holds {len(made['configs'])} virtual sites, fewer than --sites {sites}",
            hint="use a new --workspace for more sites (a workspace's sites are provisioned "
            "together)",
        )


def _make(root: Path, *, count: int, shape: DataShape) -> dict[str, Any]:
    from medfed.storage import replace_file
    from medfed.transport.provision import provision_workspace

    ids = [site_id(index) for index in range(count)]
    workspace = provision_workspace(out=root / "workspace", sites=ids, host="127.0.0.1")
    configs: list[str] = []
    train: list[int] = []
    for index in range(count):
        path, patients = _make_site(root, workspace, index=index, count=count, shape=shape)
        configs.append(str(path))
        train.append(patients)
    made = {
        "cases": shape.cases,
        "size": shape.size,
        "seed": shape.seed,
        "train_patients": min(train),
        "configs": configs,
    }
    # Written last: a root without it was interrupted and is refused, never half reused.
    replace_file(root / SIMULATION_FILE, (json.dumps(made, indent=1) + "\n").encode("utf-8"))
    return made


def _make_site(
    root: Path, workspace: Workspace, *, index: int, count: int, shape: DataShape
) -> tuple[Path, int]:
    from medfed.config.loading import dump_site_config
    from medfed.config.site import (
        DataSection,
        PathsSection,
        PolicySection,
        PrivacySection,
        ReleaseSection,
        SiteConfig,
        TrainingSection,
        TransportSection,
    )
    from medfed.data.synth import synthesize_site

    name = site_id(index)
    site_dir = root / "sites" / name
    data = synthesize_site(
        out=site_dir / "data",
        cases=shape.cases,
        size=shape.size,
        seed=shape.seed + 101 * index,
        # intensity styles spread over [-0.5, 0.5]: a non-IID federation
        site_shift=-0.5 + index / (count - 1) if count > 1 else 0.0,
        spatial_dims=2,
        site_id=name,
    )
    kit = workspace.root / workspace.site(name).kit
    config = SiteConfig(
        site_id=name,
        data=DataSection(
            manifest=data.manifest,
            patch_size=list(data.patch_size),
            spacing=[1.25, 1.25],
        ),
        # Full batch: every step samples each patient with probability 1, so the accounting of
        # a step is closed-form RDP. At small Poisson rates Opacus' RDP series costs about
        # 0.25 s per epsilon, which thousands of sites would spend in accounting alone.
        training=TrainingSection(batch_size=data.n_train, threads=1, seed=shape.seed + index),
        privacy=PrivacySection(noise_multiplier=SITE_NOISE, epsilon_cap=SITE_CAP, delta=SITE_DELTA),
        paths=PathsSection(workdir=site_dir / "work", signing_key=kit / "ledger_key.pem"),
        policy=PolicySection(max_epsilon_per_round=SITE_CAP),
        release=ReleaseSection(
            patient_counts="public", validation_dice="public", public_reason=SYNTHETIC_REASON
        ),
        transport=TransportSection(
            superlink_address=workspace.manifest.address,
            root_certificates=kit / "ca.crt",
            node_private_key=kit / "node_key",
            node_public_key=kit / "node_key.pub",
        ),
    )
    path = site_dir / "site.yaml"
    dump_site_config(config, path)
    data.config.unlink()  # synth's own site.yaml would only mislead: this one is the site's
    return path, data.n_train
