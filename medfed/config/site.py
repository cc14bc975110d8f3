"""Pydantic models of a site's configuration file (``site.yaml``).

Every model forbids unknown keys so that a typo such as ``noise_multipler`` is reported instead
of silently falling back to a default. Relative paths are resolved against the directory of the
configuration file by :func:`medfed.config.loading.load_site_config`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.privacy.budget import PrivacyTerms
from medfed.workspace import RECEIPT_KEY_FILE, SITE_ID_PATTERN

Accountant = Literal["rdp", "prv", "pld"]
# "vmap" is torch.func over the whole network; "hooks" and "functorch" are Opacus' modes. Opacus'
# "ew" cannot train MONAI's UNet (no PReLU rule) and ghost clipping needs a per-sample loss that
# MONAI's DiceCELoss does not give: both are left out (see benchmarks/README.md).
GradSampleMode = Literal["vmap", "hooks", "functorch"]
DeviceName = Literal["auto", "cpu", "cuda"]
# The allow-list entry that stands for the Flower app of the installed medfed version.
MEDFED_APP = "medfed"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Strict):
    """Where the site's cases are and how they become network inputs."""

    manifest: Path = Field(description="CSV or YAML manifest: patient_id, image, label[, split].")
    classes: list[int] = Field(
        default=[0, 1], min_length=2, description="Label values allowed in label images; 0 first."
    )
    patch_size: list[int] = Field(
        default=[32, 32, 32], min_length=2, max_length=3, description="Crop/pad size (voxels)."
    )
    spacing: list[float] | None = Field(
        default=None, description="Resample to this voxel spacing (mm); null keeps each scan's."
    )
    val_fraction: float = Field(
        default=0.2, ge=0.0, lt=1.0, description="Validation share when the manifest has no split."
    )
    cache_dir: Path | None = Field(
        default=None, description="Preprocessed-volume cache (defaults to workdir/cache)."
    )
    allow_empty_labels: bool = Field(
        default=False,
        description="Accept cases without foreground (negative cases); otherwise an error.",
    )
    bad_cases: Literal["refuse", "exclude"] = Field(
        default="refuse",
        description="A case that fails its check: refuse to train (default), or leave it out.",
    )
    strict_geometry: bool = Field(
        default=False,
        description="Oblique or non-invertible affines are errors (otherwise warnings).",
    )
    max_voxels: int = Field(
        default=1 << 30,
        ge=1,
        description="Largest volume a header may declare; a larger one is refused unread.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.classes[0] != 0 or len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct and start with background 0, e.g. [0, 1]")
        if any(s < 4 for s in self.patch_size):
            raise ValueError("every patch_size entry must be at least 4 voxels")
        if self.spacing is not None and len(self.spacing) != len(self.patch_size):
            raise ValueError("spacing must have as many entries as patch_size")
        if self.spacing is not None and any(s <= 0 for s in self.spacing):
            raise ValueError("spacing entries must be positive")
        return self


class ModelSection(_Strict):
    """Which segmentation network the site trains."""

    network: Literal["unet", "attention_unet"] = "unet"
    channels: list[int] = Field(default=[8, 16, 32], min_length=2)
    strides: list[int] = Field(default=[2, 2], min_length=1)
    num_res_units: int = Field(default=1, ge=0)
    norm: Literal["instance", "group"] = "instance"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("strides must have one entry fewer than channels")
        return self


class TrainingSection(_Strict):
    """Optimisation settings for local training."""

    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(
        default=4, ge=1, description="Expected patients per step; sample rate = batch_size / N."
    )
    sample_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Poisson sample rate of every step, 1 / rate steps per epoch; null = "
        "batch_size / N with the released N, or 1 (full batch) where the counts are sealed "
        "under secure aggregation, since a rate computed from N would show it.",
    )
    learning_rate: float = Field(default=2e-2, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    device: DeviceName = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads; null = all cores.")
    seed: int = 0
    grad_sample_mode: GradSampleMode = "vmap"
    augmentation_multiplicity: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Augmented views per sampled patient per step, their gradients averaged "
        "before clipping (De et al. 2022): same privacy, K times the compute; 1 = one view.",
    )


class AdaptiveClipping(_Strict):
    """Clip to a DP estimate of a quantile of the patients' gradient norms (Andrew et al. 2021).

    Each step also releases the noisy count of sampled patients whose gradient norm is within
    the clip, and the clip moves geometrically towards ``target_quantile``. The pair (clipped
    sum, count) spends exactly what plain DP-SGD at the round's noise multiplier spends: the
    sum gets a little more noise (:func:`medfed.privacy.accounting.adaptive_clipping_noise`).
    ``privacy.max_grad_norm`` is the clip a run starts from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    target_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="Share of patients whose gradient is not clipped."
    )
    learning_rate: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="The clip changes by a factor of at most exp(this x |unclipped share - "
        "target|) per step.",
    )
    count_noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        description="Noise on the count of unclipped patients over that count's sensitivity "
        "1/2 (its standard deviation is half of this, in patients); must exceed the round's "
        "noise multiplier. Null: 5 x the round's noise multiplier (the sum's noise grows 2%).",
    )


class PrivacySection(_Strict):
    """DP-SGD settings and the site's lifetime privacy cap.

    A run may ask for more noise than ``noise_multiplier`` and never less, and a round never
    spends more than ``target_epsilon_per_round`` when that is set: the site's settings are
    ceilings that a run cannot lift.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon_per_round: float | None = Field(default=None, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    epsilon_cap: float = Field(default=8.0, gt=0, description="Lifetime cap at `delta`.")
    accountant: Accountant = "rdp"
    secure_mode: bool = Field(
        default=False,
        description="Noise as the sum of four CSPRNG Gaussians, against floating-point attacks.",
    )
    adaptive_clipping: AdaptiveClipping | None = Field(
        default=None, description="Null: clip every patient's gradient to max_grad_norm."
    )

    @model_validator(mode="after")
    def _one_noise_setting(self) -> Self:
        if (self.noise_multiplier is None) == (self.target_epsilon_per_round is None):
            raise ValueError("set exactly one of noise_multiplier or target_epsilon_per_round")
        return self


class ReleaseSection(_Strict):
    """What may leave the site besides the DP weights and the signed ledger, and how.

    Every number in a reply is recorded in the ledger as a release with its mechanism: the
    patient counts through a Gaussian mechanism (once per dataset), the training loss as one
    more coordinate of each patient's clipped DP-SGD gradient (no extra privacy), the
    validation Dice through a Gaussian mechanism, or as public when this section says so and
    why (synthetic data, a published benchmark set).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    patient_counts: Literal["dp", "public"] = Field(
        default="dp",
        description="dp: the counts get Gaussian noise; public: the exact counts (only where "
        "they are public anyway: synthetic data, a published cohort).",
    )
    count_noise_multiplier: float = Field(
        default=5.0,
        gt=0,
        description="Standard deviation (patients) of the noise on the training and validation "
        "patient counts; released once per dataset, they set the sampling rate and weights.",
    )
    loss_clip: float = Field(
        default=2.0, gt=0, description="Each patient's training loss is clipped to [0, this]."
    )
    loss_share: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="Share of the clipping norm the loss coordinate may take in each patient's "
        "clipped gradient (larger: a less noisy loss, a little less gradient).",
    )
    validation_dice: Literal["dp", "public", "withheld"] = Field(
        default="dp", description="dp: Gaussian noise on the sum of per-patient Dice."
    )
    dice_noise_multiplier: float = Field(
        default=4.0, gt=0, description="Noise on the Dice sum, in units of one patient's Dice."
    )
    min_validation_patients: int = Field(
        default=20,
        ge=1,
        description="No Dice is released when the released validation count is smaller.",
    )
    max_evaluations_per_run: int = Field(
        default=4, ge=0, description="Dice releases per run, at most (each one costs privacy)."
    )
    public_reason: str | None = Field(
        default=None, description="Why values declared public may be (required for public)."
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        public = [
            name
            for name in ("patient_counts", "validation_dice")
            if getattr(self, name) == "public"
        ]
        if public and not (self.public_reason or "").strip():
            raise ValueError(f"{' and '.join(public)}: public needs a public_reason")
        return self


class PathsSection(_Strict):
    """Where the site keeps its durable state."""

    workdir: Path = Field(default=Path(".medfed"), description="Checkpoints, metrics, cache.")
    ledger: Path | None = Field(default=None, description="Defaults to workdir/ledger.jsonl.")
    signing_key: Path | None = Field(
        default=None, description="Ed25519 key (PEM); defaults to workdir/keys/ledger_ed25519.pem."
    )
    head_witness: Path | None = Field(
        default=None,
        description="A directory on another volume keeping a copy of the ledger's signed head, "
        "so that restoring an old ledger directory is detected.",
    )


class TransportSection(_Strict):
    """How the site's node reaches the aggregator (from the kit `medfed provision` made)."""

    superlink_address: str = Field(
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
        description="host:port of the aggregator's Flower SuperLink ([v6]:port for IPv6).",
    )
    root_certificates: Path = Field(description="CA certificate that signed the SuperLink's.")
    node_private_key: Path = Field(description="This node's EC P-384 key (OpenSSH, mode 0600).")
    node_public_key: Path = Field(description="Its public half, registered at the aggregator.")
    receipt_public_key: Path | None = Field(
        default=None,
        description="The aggregator's receipt key (aggregator_receipt.pub of the kit); by "
        "default that file beside root_certificates, when it is there.",
    )
    warm_worker: bool = Field(
        default=True,
        description="Keep one worker with torch, MONAI and Opacus imported that forks the "
        "ClientApp of every message (seconds less per message); false starts each cold.",
    )


class DistributedNoisePolicy(_Strict):
    """Whether a run may ask this site for only a share of the noise (distributed noise).

    With distributed noise the site's guarantee against the aggregator rests on secure
    aggregation and on at least ``min_sites`` sites adding their share; against all of them
    colluding, only its own share protects it. The ledger records both epsilons, and ``budget``
    names the one the site's cap is enforced on.
    """

    allowed: bool = Field(default=False, description="Accept runs with distributed noise.")
    min_sites: int = Field(
        default=3, ge=2, description="Refuse runs that count on fewer sites' noise shares."
    )
    budget: Literal["distributed", "local"] = Field(
        default="distributed",
        description="The epsilon the cap is enforced on: with the other sites' shares "
        "(distributed) or with this site's share alone (local).",
    )


class PolicySection(_Strict):
    """What this site lets a federation run do with its data (checked before any data is read)."""

    allowed_networks: list[Literal["unet", "attention_unet"]] = Field(
        default=["unet", "attention_unet"], min_length=1
    )
    max_local_epochs: int = Field(default=20, ge=1, description="Local epochs per round, at most.")
    min_noise_multiplier: float | None = Field(
        default=0.5, gt=0, description="Refuse runs that ask for less noise than this."
    )
    max_epsilon_per_round: float | None = Field(
        default=None,
        gt=0,
        description="Refuse rounds that would spend more than this alone; null: a quarter of "
        "privacy.epsilon_cap.",
    )
    max_rounds_per_run: int | None = Field(
        default=50, ge=1, description="Refuse runs that plan more rounds than this."
    )
    max_parameters: int | None = Field(
        default=None, ge=1, description="Refuse networks with more trainable parameters."
    )
    accepted_projects: list[str] = Field(
        default=["*"], min_length=1, description="Glob patterns of the projects a run may be in."
    )
    accepted_runs: list[str] = Field(
        default=["*"], min_length=1, description="Glob patterns of the run names accepted."
    )
    distributed_noise: DistributedNoisePolicy = DistributedNoisePolicy()
    allowed_app_hashes: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Flower app bundles this node runs, by SHA-256 (of the .fab file or medfed's "
        "content digest); 'medfed' stands for the installed medfed's own app. Null: only that.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("accepted_projects", "accepted_runs"):
            if any(not pattern.strip() for pattern in getattr(self, name)):
                raise ValueError(f"{name} holds an empty pattern")
        for entry in self.allowed_app_hashes or []:
            if entry != MEDFED_APP and not _SHA256.match(entry):
                raise ValueError(
                    f"allowed_app_hashes entry {entry!r} is neither {MEDFED_APP!r} nor a "
                    "SHA-256 of 64 lowercase hex digits"
                )
        return self

    @property
    def app_allow_list(self) -> tuple[str, ...]:
        """The allow-list with its default filled in: ('medfed',) when none is set."""
        return tuple(self.allowed_app_hashes or (MEDFED_APP,))


class SiteConfig(_Strict):
    """A site's whole configuration."""

    site_id: str = Field(pattern=SITE_ID_PATTERN.pattern)
    data: DataSection
    model: ModelSection = ModelSection()
    training: TrainingSection = TrainingSection()
    privacy: PrivacySection = PrivacySection(noise_multiplier=1.0)
    paths: PathsSection = PathsSection()
    policy: PolicySection = PolicySection()
    release: ReleaseSection = ReleaseSection()
    transport: TransportSection | None = None

    @model_validator(mode="after")
    def _patch_fits_network(self) -> Self:
        factor = math.prod(self.model.strides)
        if any(size % factor for size in self.data.patch_size):
            raise ValueError(
                f"data.patch_size {self.data.patch_size} must be divisible by {factor} "
                f"(the product of model.strides {self.model.strides})"
            )
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.data.patch_size)

    @property
    def terms(self) -> PrivacyTerms:
        """The accountant, delta and cap the site's ledger is kept under."""
        privacy = self.privacy
        return PrivacyTerms(
            accountant=privacy.accountant, delta=privacy.delta, epsilon_cap=privacy.epsilon_cap
        )

    @property
    def max_epsilon_per_round(self) -> float:
        """The policy's limit on one round's epsilon, with its default filled in."""
        limit = self.policy.max_epsilon_per_round
        return self.privacy.epsilon_cap / 4.0 if limit is None else limit

    @property
    def ledger_path(self) -> Path:
        return self.paths.ledger or self.paths.workdir / "ledger.jsonl"

    @property
    def signing_key_path(self) -> Path:
        return self.paths.signing_key or self.paths.workdir / "keys" / "ledger_ed25519.pem"

    @property
    def receipt_key_path(self) -> Path | None:
        """The aggregator's receipt key the site checks receipts with (None: not federated)."""
        transport = self.transport
        if transport is None:
            return None
        if transport.receipt_public_key is not None:
            return transport.receipt_public_key
        beside = transport.root_certificates.parent / RECEIPT_KEY_FILE
        return beside if beside.exists() else None

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir or self.paths.workdir / "cache"
