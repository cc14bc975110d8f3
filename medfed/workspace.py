"""A federation's workspace on the aggregator's host: its manifest, and every path in it.

``medfed provision`` writes the workspace (:mod:`medfed.transport.provision`); everything that
reads or writes in it asks this module where things are::

    workspace.yaml                  the manifest: sites, host, port, public keys (no secrets)
    ca/, superlink/, sites/<site>/  the CA, the SuperLink's TLS files, one kit per site
    aggregator/receipt_key.pem      signs the receipts of ledger entries the aggregator holds
    ledgers/<site>.ledger.jsonl     the aggregator's verified copy of each site's ledger
    runs/<run>/                     one run: settings, events, global models, state, summary,
                                    its report, MLflow bookkeeping (:class:`RunPaths`)
    state/                          the SuperLink's database and Flower's home
    logs/                           the processes' logs
    mlflow.db, mlartifacts/         the embedded MLflow store, when no other is given

:class:`WorkspaceLayout` needs only the root directory (auditors and tools read a workspace
without loading its manifest); :class:`Workspace` is a loaded manifest with its layout.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfed.errors import ConfigError
from medfed.privacy.keys import key_id, load_or_create_signing_key, load_public_key

SITE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
WORKSPACE_FILE = "workspace.yaml"
# The aggregator's receipt key as a site's kit holds it (beside the kit's ca.crt).
RECEIPT_KEY_FILE = "aggregator_receipt.pub"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaPaths(_Strict):
    """Where the CA lives, relative to the workspace."""

    cert: str
    key: str


class SuperlinkPaths(_Strict):
    """Files for ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``."""

    cert: str
    key: str
    ca_cert: str


class ReceiptKeyPaths(_Strict):
    """The aggregator's Ed25519 key for ledger receipts (:mod:`medfed.privacy.receipt`)."""

    key: str
    public_key_file: str
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")


class SiteEntry(_Strict):
    """One site's kit, its public node key (to ``flwr supernode register``) and the public half
    of its ledger signing key (the aggregator verifies the site's privacy ledger with it)."""

    site_id: str = Field(pattern=SITE_ID_PATTERN.pattern)
    kit: str
    node_key: str
    node_public_key_file: str
    public_key: str = Field(pattern=r"^ecdsa-sha2-nistp384 [A-Za-z0-9+/=]+$")
    fingerprint: str
    ledger_public_key_file: str
    ledger_key_id: str = Field(pattern=r"^[0-9a-f]{16}$")


class WorkspaceManifest(_Strict):
    """The content of ``workspace.yaml``."""

    version: int = Field(default=1, ge=1, le=1)
    created_at: dt.datetime
    host: str
    port: int = Field(ge=1, le=65535)
    address: str
    ca: CaPaths
    superlink: SuperlinkPaths
    certificate_not_after: dt.datetime
    sites: list[SiteEntry] = Field(min_length=1)
    # None in a workspace provisioned before receipts: its sites get none.
    receipts: ReceiptKeyPaths | None = None


@dataclass(frozen=True)
class Workspace:
    """A provisioned workspace: its root directory and its manifest."""

    root: Path
    manifest: WorkspaceManifest

    @property
    def layout(self) -> WorkspaceLayout:
        return WorkspaceLayout(root=self.root)

    def path(self, relative: str) -> Path:
        """Absolute path of a manifest entry."""
        return self.root / relative

    def site(self, site_id: str) -> SiteEntry:
        """The entry of ``site_id``; :class:`ConfigError` if the workspace has no such site."""
        for entry in self.manifest.sites:
            if entry.site_id == site_id:
                return entry
        known = ", ".join(s.site_id for s in self.manifest.sites)
        raise ConfigError(f"no site {site_id!r} in {self.root}", hint=f"known sites: {known}")

    def ledger_public_key(self, site_id: str) -> Ed25519PublicKey:
        """The public key that verifies ``site_id``'s privacy ledger.

        The file is checked against the key id in the manifest, so that a ``.pub`` swapped
        after provisioning cannot make the aggregator accept another key's ledger.
        """
        entry = self.site(site_id)
        path = self.path(entry.ledger_public_key_file)
        key = load_public_key(path)
        found = key_id(key)
        if found != entry.ledger_key_id:
            raise ConfigError(
                f"{path}: ledger key {found} of site {site_id!r} is not the key "
                f"{entry.ledger_key_id} registered in {self.root / WORKSPACE_FILE}",
                hint="restore the site's ledger_key.pub from the provisioned kit",
            )
        return key

    def receipt_signing_key(self) -> Ed25519PrivateKey | None:
        """The key the aggregator signs ledger receipts with (None: the workspace has none)."""
        receipts = self.manifest.receipts
        if receipts is None:
            return None
        path = self.path(receipts.key)
        if not path.exists():
            raise ConfigError(
                f"{path}: the aggregator's receipt key is missing",
                hint="restore the workspace's aggregator/ directory from backup",
            )
        key = load_or_create_signing_key(path)
        if key_id(key.public_key()) != receipts.key_id:
            raise ConfigError(
                f"{path}: receipt key {key_id(key.public_key())} is not the key "
                f"{receipts.key_id} registered in {self.root / WORKSPACE_FILE}",
                hint="restore the workspace's aggregator/ directory from backup",
            )
        return key

    def node_public_key_pem(self, site_id: str) -> bytes:
        """The site's node key as Flower reports it in ``NodeInfo.public_key``.

        ``flwr supernode register`` reads the OpenSSH key and stores it as PEM
        SubjectPublicKeyInfo (flwr's ``public_key_to_bytes``); the same bytes here let the
        aggregator tell which site a Flower node id belongs to.
        """
        return _node_key_pem(self.site(site_id).public_key)

    def site_for_node_key(self, pem: bytes) -> str | None:
        """The site whose registered node key is ``pem`` (PEM SubjectPublicKeyInfo), if any."""
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        wanted = spki_pem(key)
        for entry in self.manifest.sites:
            if _node_key_pem(entry.public_key) == wanted:
                return entry.site_id
        return None


def spki_pem(key: ec.EllipticCurvePublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _node_key_pem(public_openssh: str) -> bytes:
    key = serialization.load_ssh_public_key(public_openssh.encode("ascii"))
    if not isinstance(key, ec.EllipticCurvePublicKey):  # the manifest pattern rules this out
        raise ConfigError("node public key is not an EC key", hint="re-provision")
    return spki_pem(key)


LEDGERS_DIR: Final = "ledgers"
LEDGER_SUFFIX: Final = ".ledger.jsonl"
RUNS_DIR: Final = "runs"
STATE_DIR: Final = "state"
LOGS_DIR: Final = "logs"
MLFLOW_DB: Final = "mlflow.db"
MLFLOW_ARTIFACTS: Final = "mlartifacts"
# Directories that hold a federation's history; a forced re-provision must not delete them.
PROTECTED_DIRS: Final = ("ledger", LEDGERS_DIR, STATE_DIR)


def ledger_copy_file(ledgers_dir: Path, site_id: str) -> Path:
    """The aggregator's copy of one site's ledger, in a directory of copies."""
    return Path(ledgers_dir) / f"{site_id}{LEDGER_SUFFIX}"


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files are, under ``<workspace>/runs/<run>/``."""

    directory: Path

    @property
    def settings(self) -> Path:
        return self.directory / "settings.json"

    @property
    def events(self) -> Path:
        return self.directory / "events.jsonl"

    @property
    def state(self) -> Path:
        """The last completed round and where its model is (written last)."""
        return self.directory / "state.json"

    @property
    def strategy_state(self) -> Path:
        return self.directory / "strategy.safetensors"

    @property
    def summary(self) -> Path:
        return self.directory / "summary.json"

    @property
    def global_models(self) -> Path:
        return self.directory / "global"

    def global_model(self, round_index: int) -> Path:
        """The global model after round ``round_index`` (0: the initial one)."""
        return self.global_models / f"round-{round_index:04d}"

    @property
    def report(self) -> Path:
        """What a run leaves for its readers at its end: the ledgers as they stood, the budget
        state, plots and the audit report (:mod:`medfed.aggregator.finish`)."""
        return self.directory / "report"

    @property
    def mlflow_info(self) -> Path:
        """Where the run is in MLflow."""
        return self.directory / "mlflow.json"

    @property
    def mlflow_pending(self) -> Path:
        """MLflow operations not yet sent."""
        return self.directory / "mlflow-pending.jsonl"

    @property
    def mlflow_dropped(self) -> Path:
        """MLflow operations MLflow refused outright, kept for a person to look at."""
        return self.directory / "mlflow-dropped.jsonl"

    @property
    def mlflow_staging(self) -> Path:
        """Artifacts prepared for MLflow, until they are sent."""
        return self.directory / "mlflow-staging"


def run_paths(workspace_root: Path, run_name: str) -> RunPaths:
    """Where run ``run_name`` of the workspace at ``workspace_root`` keeps its files."""
    return WorkspaceLayout(root=Path(workspace_root)).run(run_name)


@dataclass(frozen=True)
class WorkspaceLayout:
    """The paths of a workspace, from its root directory alone."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / WORKSPACE_FILE

    @property
    def ledgers(self) -> Path:
        return self.root / LEDGERS_DIR

    def ledger_copy(self, site_id: str) -> Path:
        return ledger_copy_file(self.ledgers, site_id)

    def copy_site_ids(self) -> list[str]:
        """Site ids of every ledger copy on disk (registered or not)."""
        if not self.ledgers.is_dir():
            return []
        return sorted(p.name[: -len(LEDGER_SUFFIX)] for p in self.ledgers.glob(f"*{LEDGER_SUFFIX}"))

    @property
    def runs(self) -> Path:
        return self.root / RUNS_DIR

    def run(self, run_name: str) -> RunPaths:
        return RunPaths(directory=self.runs / run_name)

    def run_names(self) -> list[str]:
        """Runs with a directory, by name."""
        if not self.runs.is_dir():
            return []
        return sorted(p.name for p in self.runs.iterdir() if p.is_dir())

    @property
    def state(self) -> Path:
        """The SuperLink's state: its database and Flower's home."""
        return self.root / STATE_DIR

    @property
    def superlink_db(self) -> Path:
        """Node registrations and runs, kept across SuperLink restarts."""
        return self.state / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def mlflow_db(self) -> Path:
        return self.root / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / MLFLOW_ARTIFACTS


def load_workspace(path: Path) -> Workspace:
    """Read a workspace back from its directory (or its ``workspace.yaml``)."""
    path = Path(path)
    file = path if path.is_file() else path / WORKSPACE_FILE
    hint = "run `medfed provision --out DIR --sites ...` first, or point at that DIR"
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no workspace file", hint=hint) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror})", hint=hint) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({exc})", hint="re-provision") from None
    try:
        manifest = WorkspaceManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{file}: invalid workspace ({problems})", hint="re-provision") from None
    return Workspace(root=file.parent.absolute(), manifest=manifest)
