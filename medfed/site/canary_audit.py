"""An empirical privacy audit of the site's DP-SGD path in one training run (canary-only).

Steinke, Nasr and Jagielski 2023 ("Privacy auditing with one (1) training run", NeurIPS,
arXiv:2305.08846): ``m`` canary patients, each put into the training data with probability
1/2 by a draw from OS entropy, one DP-SGD run, a membership score per canary, and the paper's
lower bound on epsilon from the auditor's right guesses (:mod:`medfed.privacy.one_run_audit`).
A lower bound above the epsilon the run's own ledger claims proves, at the stated confidence,
that the DP-SGD path leaks more than it records: noise lost, clipping off, a sample rate or a
step count recorded wrong. An honest run can only show such a bound with probability at most
1 - confidence.

Canary-only, by choice: the audit run trains on the canaries alone. They are synthetic
patients generated at the site in its own geometry (:mod:`medfed.site.canary_data`); no
patient's data is read, nothing about any patient can leave through the audit, and the site's
privacy ledger and budget are never touched. The run keeps a throw-away ledger of its own in
``WORKDIR/audit/canary-<stamp>/`` (its signing key is deleted once the run is committed), and
the claimed epsilon is recomputed from that ledger with the project's accountant, as for any
site run. Everything else is the site's: its network and initialisation, optimiser, clipping
norm, batch size, epochs, per-sample gradient mode, secure mode, delta and accountant, and the
trainer's own code (DP wrapping, Poisson sampling over patients, the DP step and its checks,
reserve and commit); the gradient score replaces only each sampled canary's per-sample gradient
and crop (:mod:`medfed.site.canary_scores`). Only the noise multiplier is the audit's: it is
planned so that the run's claim is ``epsilon`` (default 2, small enough that an honest run stays
far below any bound a broken run reaches), over a sample rate fixed before the inclusion draw:
the site's ``training.sample_rate`` where it sets one, else its batch size over half the
canaries.

The result is written to ``WORKDIR/audit/canary-<stamp>.json`` (see
:meth:`CanaryAuditResult.to_json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError
from medfed.privacy.accounting import compute_epsilon, noise_for_target_epsilon
from medfed.privacy.budget import PrivacyTerms
from medfed.privacy.one_run_audit import (
    RESULT_SCHEMA,
    AuditBound,
    audit_scores,
    epsilon_lower_bound,
    guess_counts_for,
)
from medfed.privacy.sampling import SamplingPlan, plan_site_sampling
from medfed.privacy.site_ledger import RoundPlan, SiteLedger
from medfed.site.canary_options import (
    DEFAULT_CANARIES,
    DEFAULT_CONFIDENCE,
    DEFAULT_EPSILON,
    MIN_CANARIES,
    ScoreKind,
)
from medfed.site.release import PatientCounts
from medfed.site.round_plan import RoundSetup
from medfed.storage import replace_file

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("medfed.site")

REFERENCE: Final = (
    "Steinke, Nasr, Jagielski 2023, Privacy auditing with one (1) training run, arXiv:2305.08846"
)


@dataclass(frozen=True)
class CanaryAuditResult:
    """What one canary audit run found; ``violated`` when the bound exceeds the claim."""

    site_id: str
    run_id: str
    score: ScoreKind
    target_epsilon: float
    claimed_epsilon: float
    accountant: str
    bound: AuditBound
    included: int
    plan: RoundPlan
    steps: int
    ledger: Path
    result_file: Path
    created: str
    seconds: float

    @property
    def violated(self) -> bool:
        return self.bound.epsilon > self.claimed_epsilon

    def to_json(self) -> dict[str, Any]:
        """The result document: the five headline keys first, then the run's details."""
        bound = self.bound
        return {
            "claimed_epsilon": self.claimed_epsilon,
            "empirical_epsilon_lower_bound": bound.epsilon,
            "confidence": bound.confidence,
            "canaries": bound.canaries,
            "violated": self.violated,
            "schema": RESULT_SCHEMA,
            "site_id": self.site_id,
            "run_id": self.run_id,
            "created": self.created,
            "score": self.score,
            "guesses": bound.guesses,
            "correct": bound.correct,
            "guess_counts": list(bound.guess_counts),
            "included_canaries": self.included,
            "target_epsilon": self.target_epsilon,
            "delta": bound.delta,
            "accountant": self.accountant,
            "sample_rate": self.plan.sample_rate,
            "noise_multiplier": self.plan.noise_multiplier,
            "max_grad_norm": self.plan.max_grad_norm,
            "steps": self.steps,
            "ledger": str(self.ledger),
            "seconds": self.seconds,
            "reference": REFERENCE,
        }


def check_audit_request(*, canaries: int, epsilon: float, confidence: float, delta: float) -> None:
    """Refuse an audit that could never flag a violation of an ``epsilon`` claim."""
    if canaries < MIN_CANARIES:
        raise ConfigError(
            f"--canaries {canaries}: a canary audit needs at least {MIN_CANARIES} canaries",
            hint=f"use --canaries {DEFAULT_CANARIES}",
        )
    if not 0.0 < epsilon < math.inf:
        raise ConfigError(f"--epsilon {epsilon}: must be a finite number > 0", hint="e.g. 2")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence {confidence}: must be in (0, 1)", hint="e.g. 0.95")
    counts = guess_counts_for(canaries)
    per_test = 1.0 - (1.0 - confidence) / len(counts)
    # the bound of a perfect attack: every guess right, at the largest guess count
    best = epsilon_lower_bound(
        canaries=canaries, guesses=canaries, correct=canaries, delta=delta, confidence=per_test
    )
    if best <= epsilon:
        raise ConfigError(
            f"{canaries} canaries can prove at most epsilon {best:.2f} at confidence "
            f"{confidence:g} (delta {delta:g}), not more than the claim {epsilon:g} to audit",
            hint="use more canaries (--canaries) or audit a smaller claim (--epsilon)",
        )


def run_canary_audit(
    *,
    config: SiteConfig,
    canaries: int = DEFAULT_CANARIES,
    epsilon: float = DEFAULT_EPSILON,
    confidence: float = DEFAULT_CONFIDENCE,
    score: ScoreKind = "gradient",
    seed: int | None = None,
) -> CanaryAuditResult:
    """Run one canary-only audit of ``config``'s DP-SGD path and write its result file.

    The canaries' images, their inclusion and the gradient coordinates come from OS entropy,
    unless ``seed`` is given (reproducible audits in tests); DP noise and Poisson sampling
    always come from the site's own generators.
    """
    import numpy as np

    from medfed.models import resolve_device
    from medfed.site.canary_scores import canary_coordinates
    from medfed.site.trainer import build_site_model

    started = time.monotonic()
    privacy = config.privacy
    check_audit_request(
        canaries=canaries, epsilon=epsilon, confidence=confidence, delta=privacy.delta
    )
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(16)))
    device = resolve_device(name=config.training.device, threads=config.training.threads)
    model, _ = build_site_model(config=config, device=device)
    coordinates = (
        canary_coordinates(module=model, count=canaries, rng=rng) if score == "gradient" else []
    )
    now = datetime.now(UTC)
    stamp = f"{now:%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}"
    audit_root = config.paths.workdir / "audit"
    audit_dir = audit_root / f"canary-{stamp}"
    audit_dir.mkdir(parents=True)
    run_id = f"canary-audit-{stamp}"

    nominal = math.ceil(canaries / 2)
    sampling = plan_site_sampling(  # the rate the site's rounds draw at
        dataset_size=nominal,
        batch_size=config.training.batch_size,
        sample_rate=config.training.sample_rate,
        epochs=config.training.epochs,
    )
    plan = RoundPlan(
        run_id=run_id,
        round=0,
        planned_rounds=None,
        steps=sampling.steps,
        sample_rate=sampling.sample_rate,
        noise_multiplier=noise_for_target_epsilon(
            target_epsilon=epsilon,
            sample_rate=sampling.sample_rate,
            steps=sampling.steps,
            delta=privacy.delta,
            accountant=privacy.accountant,
        ),
        max_grad_norm=privacy.max_grad_norm,
    )
    members = [bool(m) for m in rng.random(canaries) < 0.5]
    # A ledger of its own, never the site's: no head witness, no receipts, its own key.
    key_path = audit_dir / "keys" / "audit_ed25519.pem"
    ledger = SiteLedger(path=audit_dir / "ledger.jsonl", key_path=key_path, site_id=config.site_id)
    terms = PrivacyTerms(accountant=privacy.accountant, delta=privacy.delta, epsilon_cap=epsilon)
    try:
        with tempfile.TemporaryDirectory(prefix="canaries-", dir=audit_root) as scratch:
            scores, steps = _train_and_score(
                config=config,
                model=model,
                device=device,
                ledger=ledger,
                terms=terms,
                plan=plan,
                sampling=sampling,
                members=members,
                score=score,
                coordinates=coordinates,
                rng=rng,
                scratch=Path(scratch),
            )
    finally:
        # sealed: its public key still verifies it, and nothing can be appended to it
        key_path.unlink(missing_ok=True)
    claimed = ledger.spent(delta=terms.delta, accountant=terms.accountant)
    bound = audit_scores(scores=scores, members=members, delta=privacy.delta, confidence=confidence)
    result = CanaryAuditResult(
        site_id=config.site_id,
        run_id=run_id,
        score=score,
        target_epsilon=epsilon,
        claimed_epsilon=claimed,
        accountant=privacy.accountant,
        bound=bound,
        included=sum(members),
        plan=plan,
        steps=steps,
        ledger=ledger.path,
        result_file=audit_root / f"canary-{stamp}.json",
        created=now.isoformat(timespec="seconds"),
        seconds=time.monotonic() - started,
    )
    write_result(result.result_file, result.to_json())
    log.info(
        "canary audit %s: claimed epsilon %.3f, lower bound %.3f at %g (%d of %d guesses right)",
        run_id,
        claimed,
        bound.epsilon,
        confidence,
        bound.correct,
        bound.guesses,
    )
    return result


def _train_and_score(
    *,
    config: SiteConfig,
    model: Any,
    device: Any,
    ledger: SiteLedger,
    terms: PrivacyTerms,
    plan: RoundPlan,
    sampling: SamplingPlan,
    members: list[bool],
    score: ScoreKind,
    coordinates: list[int],
    rng: np.random.Generator,
    scratch: Path,
) -> tuple[list[float], int]:
    """Write the canaries, train on the included ones as the trainer does; scores and steps."""
    from medfed.data.dataset import PatientDataset, ValidationDataset
    from medfed.site.canary_data import (
        canary_data_section,
        first_patch,
        included_cases,
        write_canaries,
    )
    from medfed.site.canary_scores import GradientCanaries, RecordingSampler, canary_losses
    from medfed.site.epochs import Progress, private_training, train_epochs

    cases = write_canaries(
        config=config,
        count=len(members),
        directory=scratch / "synth",
        seed=int(rng.integers(2**63)),
        mislabel=score == "loss",
    )
    data = canary_data_section(config, manifest=scratch / "synth" / "manifest.csv")
    training = PatientDataset(
        included_cases(cases, members),
        data=data,
        seed=int(rng.integers(2**31)),
        cache_dir=None,
        random_transform=first_patch(config.data.patch_size) if score == "gradient" else None,
    )
    volumes = ValidationDataset(cases, data=data) if score == "loss" else None

    def losses() -> list[float]:
        assert volumes is not None
        patch = config.data.patch_size
        return canary_losses(model=dp.module, volumes=volumes, patch_size=patch, device=device)

    # The canary count is the auditor's choice, public: it stands in for the released counts.
    setup = RoundSetup(
        counts=PatientCounts(train=sampling.dataset_size, validation=0, seq=-1),
        sampling=sampling,
        plan=plan,
        prior=(),
    )
    dp = private_training(config=config, model=model, setup=setup, proximal_mu=0.0)
    sampler = RecordingSampler(num_patients=len(training), sample_rate=plan.sample_rate)
    canaries: GradientCanaries | None = None
    if score == "gradient":
        canaries = GradientCanaries(
            module=dp.module,
            coordinates=coordinates,
            included=[i for i, member in enumerate(members) if member],
            sampler=sampler,
            plan=plan,
            expected_batch_size=sampling.expected_batch_size,
        )
        dp = dataclasses.replace(dp, per_sample_gradients=canaries.gradients)
        dp.optimizer.attach_step_hook(canaries.observe)  # type: ignore[attr-defined]
    before = losses() if score == "loss" else []
    reservation = ledger.reserve(plan=plan, terms=terms)
    progress = Progress()
    try:
        train_epochs(
            dp=dp,
            dataset=training,
            sampler=sampler,
            plan=sampling,
            device=device,
            progress=progress,
            epsilon_after=lambda steps: compute_epsilon(
                history=[dataclasses.replace(plan.dp_steps, steps=steps)],
                delta=terms.delta,
                accountant=terms.accountant,
            ),
            on_step=None,
        )
    finally:
        ledger.commit(reservation, steps=progress.steps)
    if canaries is not None:
        return [float(s) for s in canaries.scores], progress.steps
    after = losses()
    return [b - a for b, a in zip(before, after, strict=True)], progress.steps


def write_result(path: Path, data: dict[str, Any]) -> None:
    """Write a result document as indented JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
