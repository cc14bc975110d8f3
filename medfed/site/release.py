"""The site's release policy: the one place that decides what leaves the site.

A reply carries the DP weights, the signed ledger lines the aggregator has not seen, and
nothing else: every number the aggregator learns about the site's data is a ``release`` entry
in those lines, covered by a mechanism recorded with it (:mod:`medfed.privacy.events`):

==================  ==============================================================================
quantity            mechanism
==================  ==============================================================================
patients            Gaussian noise on (training, validation) patient counts, std
                    ``release.count_noise_multiplier``, sensitivity 1 (one patient is in one
                    split); released once per dataset and reused: the sampling rate, the number of
                    steps, the FedAvg weight and the Dice denominator are computed from it, so no
                    exact count ever leaves (add/remove-one adjacency holds for all of it); or
                    the exact counts, where ``release.patient_counts`` declares them public
train_loss          one more coordinate of each patient's clipped DP-SGD gradient
                    (:class:`medfed.site.dp.LossCoordinate`): covered by the round's reservation
validation_dice     Gaussian noise on the sum of per-patient Dice (each in [0, 1]), std
                    ``release.dice_noise_multiplier``, divided by the released validation count;
                    or public, when ``release.validation_dice`` says so with a reason
==================  ==============================================================================

Under secure aggregation the Gaussian ``patients`` and ``validation_dice`` releases are
*sealed* (:mod:`medfed.privacy.sealed`): the ledger entry holds their cost and a commitment,
and their values, kept in the site's ``releases/sealed.json``, cross only inside masked sums.

What else crosses is declared public, with the reason
(:data:`medfed.privacy.events.DECLARED_PUBLIC`). A refusal
carries its code and, for the codes in :data:`SHAREABLE_CODES`, its message (built only from
the run's settings, the policy and the ledger); every other error reaches the aggregator as a
fixed sentence, and its details stay in the site's log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from medfed.config.site import SiteConfig
from medfed.errors import BudgetExceededError, DataError, MedfedError, PolicyError
from medfed.privacy import LedgerReport, Release, ReleaseEntry, SiteLedger
from medfed.privacy.events import QUANTITIES
from medfed.privacy.sealed import opens, seal
from medfed.storage import locked, make_private_dirs, read_json_object, replace_file

if TYPE_CHECKING:
    from medfed.data import SiteDatasets

log = logging.getLogger("medfed.site")

# Codes whose messages are built from the request, the policy and the ledger only.
SHAREABLE_CODES: Final = frozenset({"policy", "budget-exceeded", "envelope"})
_FIXED: Final[Mapping[str, str]] = {
    "data": "the dataset failed its check",
    "privacy-unit": "a training step broke the one-example-per-patient rule",
    "ledger": "the site's privacy ledger failed its check",
    "config": "the site's configuration does not allow this request",
    "training": "training failed at the site",
    "model": "the network could not be built or loaded at the site",
    "device": "the site's compute device is not available",
}
_PATIENTS_FILE = "patients.json"
_SEALED_FILE = "sealed.json"


@dataclass(frozen=True)
class PatientCounts:
    """The site's released (noisy) patient counts, and the ledger entry that released them."""

    train: int
    validation: int
    seq: int
    # released sealed (secure aggregation): the values stay at the site, only masked sums cross
    sealed: bool = False

    @property
    def total(self) -> int:
        return self.train + self.validation


@dataclass(frozen=True)
class DiceOutcome:
    """A round's validation Dice as released (``value``), or why none was (``withheld``)."""

    value: float | None
    noise_std: float | None
    mechanism: str | None
    withheld: str | None = None


def shareable(error: MedfedError) -> MedfedError:
    """The refusal as the aggregator may see it: its code, and its message only if data-free."""
    if error.code in SHAREABLE_CODES:
        return error
    if isinstance(error, DataError):
        return DataError(_FIXED["data"], hint="run `medfed data check` at the site")
    sentence = _FIXED.get(error.code, "the site could not answer")
    return type(error)(sentence, hint="the site's log has the details")


def unexpected() -> MedfedError:
    """What the aggregator sees of an unexpected exception at the site."""
    return MedfedError("unexpected error at the site", hint="the site's log has the details")


def dataset_fingerprint(*, train_ids: Sequence[str], validation_ids: Sequence[str]) -> str:
    """Which patients are on which side of the split (kept at the site, never sent)."""
    text = json.dumps([sorted(train_ids), sorted(validation_ids)], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def released_counts(
    *,
    config: SiteConfig,
    run_id: str,
    round_index: int = 0,
    datasets: SiteDatasets | None = None,
    sealed: bool = False,
) -> PatientCounts:
    """The released counts of the site's dataset as ``config`` describes it (see below)."""
    from medfed.data import build_datasets
    from medfed.site.ledger_of import ledger_of

    datasets = datasets or build_datasets(config)
    ledger = ledger_of(config)
    return patient_counts(
        config=config,
        ledger=ledger,
        report=ledger.verify(),
        train_ids=[case.patient_id for case in datasets.train_cases],
        validation_ids=[case.patient_id for case in datasets.val_cases],
        run_id=run_id,
        round_index=round_index,
        sealed=sealed,
    )


def patient_counts(
    *,
    config: SiteConfig,
    ledger: SiteLedger,
    report: LedgerReport,
    train_ids: Sequence[str],
    validation_ids: Sequence[str],
    run_id: str,
    round_index: int,
    sealed: bool = False,
) -> PatientCounts:
    """The released patient counts of this dataset: the ones released before, or new ones.

    A dataset's counts are released once; as long as the same patients are on the same sides
    of the split, that release is reused and costs nothing more. A changed dataset gets a new
    release, budgeted like any other.

    ``sealed`` (secure aggregation): noisy counts are released sealed (:mod:`medfed.privacy.
    sealed`), their values kept at the site; a release made before in the clear is reused, as
    its values are known already. A plain round cannot use a sealed release, whose values the
    aggregator cannot read, and makes a new one in the clear.
    """
    fingerprint = dataset_fingerprint(train_ids=train_ids, validation_ids=validation_ids)
    known = _known_counts(config, report, fingerprint, sealed=sealed)
    if known is not None:
        return known
    policy = config.release
    if policy.patient_counts == "public":
        values = {"train": float(len(train_ids)), "validation": float(len(validation_ids))}
        release = Release(
            run_id=run_id,
            round=round_index,
            quantity="patients",
            values=values,
            mechanism="public",
            reason=policy.public_reason,
        )
    else:
        noise = _gaussian(2, policy.count_noise_multiplier)
        values = {
            "train": float(max(1, round(len(train_ids) + noise[0]))),
            "validation": float(max(0, round(len(validation_ids) + noise[1]))),
        }
        release = Release(
            run_id=run_id,
            round=round_index,
            quantity="patients",
            values=values,
            mechanism="gaussian",
            noise_multiplier=policy.count_noise_multiplier,
            sensitivity=1.0,
            noise_std=policy.count_noise_multiplier,
        )
        if sealed:
            release = sealed_release(config, release)
    seq = ledger.release(release=release, terms=config.terms)
    _write_known(config, fingerprint, seq)
    counts = PatientCounts(
        train=int(values["train"]),
        validation=int(values["validation"]),
        seq=seq,
        sealed=release.sealed is not None,
    )
    log.info(
        "site %s released its patient counts (seq %d, %s%s)",
        config.site_id,
        seq,
        release.mechanism,
        ", sealed" if counts.sealed else "",
    )
    return counts


def check_delta(config: SiteConfig, patients: int, *, released: bool = True) -> None:
    """Refuse a delta that is not below one over the number of patients: the released one,
    or with ``released`` False the exact one, where the round releases none."""
    delta = config.privacy.delta
    if delta * patients >= 1.0:
        which = "released number" if released else "number"
        raise PolicyError(
            f"privacy.delta {delta:g} is not below 1 / {patients} (one over the site's "
            f"{which} of patients): at that delta DP-SGD may disclose a patient outright",
            hint="use a delta well below one over the number of patients, e.g. 1e-5",
        )


def training_loss(
    *,
    config: SiteConfig,
    ledger: SiteLedger,
    run_id: str,
    round: int,
    reservation_seq: int,
    estimates: Sequence[float],
    step_std: float,
    noise_multiplier: float,
    model_sha256: str,
) -> int | None:
    """Release the round's mean DP-SGD loss (the mean of its steps' noisy estimates)."""
    if not estimates:
        return None
    return ledger.release(
        release=Release(
            run_id=run_id,
            round=round,
            quantity="train_loss",
            values={"loss": sum(estimates) / len(estimates)},
            mechanism="dp-sgd",
            noise_multiplier=noise_multiplier,
            sensitivity=config.release.loss_clip,
            noise_std=step_std / math.sqrt(len(estimates)),
            reservation_seq=reservation_seq,
            model_sha256=model_sha256,
        ),
        terms=config.terms,
    )


def validation_dice(
    *,
    config: SiteConfig,
    ledger: SiteLedger,
    counts: PatientCounts,
    run_id: str,
    round: int,
    planned_rounds: int,
    final: bool,
    model_sha256: str,
    per_patient: Callable[[], Sequence[float]],
    sealed: bool = False,
) -> DiceOutcome:
    """Release the validation Dice of one model of a run, if the release policy allows it.

    The same model asked for twice in a run gets the same release again, at no cost. A public
    Dice is released for every model. A Gaussian one needs the released validation count to
    reach ``release.min_validation_patients`` and the budget to pay for it, and a run gets at
    most ``release.max_evaluations_per_run`` of them: one is kept for the run's final model
    (``final``), the others go to training rounds spread evenly over the planned rounds (see
    :func:`dice_rounds`). ``per_patient`` computes each validation patient's Dice, only when
    needed. ``sealed`` (secure aggregation): a Gaussian Dice is released sealed, its value
    kept at the site for the masked sum.
    """
    policy = config.release
    report = ledger.verify()
    earlier = report.releases_of(quantity="validation_dice", run_id=run_id)
    for entry in earlier:
        if entry.model_sha256 == model_sha256:
            values = opened(config, entry)
            if values is None:
                return _withheld(f"the value of sealed release seq {entry.seq} is lost")
            return DiceOutcome(
                value=values["dice"], noise_std=entry.noise_std, mechanism=entry.mechanism
            )
    if policy.validation_dice == "withheld":
        return _withheld("release.validation_dice is withheld")
    if policy.validation_dice == "dp":
        if len(earlier) >= policy.max_evaluations_per_run:
            return _withheld(
                f"run {run_id!r} had its {len(earlier)} Dice releases "
                "(release.max_evaluations_per_run)"
            )
        slots = policy.max_evaluations_per_run - 1
        if not final and round not in dice_rounds(planned_rounds=planned_rounds, slots=slots):
            return _withheld(
                f"round {round} is not one of the rounds the site releases a Dice for "
                f"({policy.max_evaluations_per_run} releases per run, the last for its final "
                "model)"
            )
        if counts.validation < policy.min_validation_patients:
            return _withheld(
                f"the released validation count {counts.validation} is below "
                f"release.min_validation_patients {policy.min_validation_patients}"
            )
    scores = [min(max(d, 0.0), 1.0) if math.isfinite(d) else 0.0 for d in per_patient()]
    if policy.validation_dice == "public":
        if not scores:
            return _withheld("the site has no validation patients")
        release = Release(
            run_id=run_id,
            round=round,
            quantity="validation_dice",
            values={"dice": sum(scores) / len(scores)},
            mechanism="public",
            model_sha256=model_sha256,
            reason=policy.public_reason,
        )
        std = None
    else:
        z = policy.dice_noise_multiplier
        noisy = sum(scores) + _gaussian(1, z)[0]
        denominator = max(counts.validation, 1)
        std = z / denominator
        release = Release(
            run_id=run_id,
            round=round,
            quantity="validation_dice",
            values={"dice": noisy / denominator},
            mechanism="gaussian",
            noise_multiplier=z,
            sensitivity=1.0,
            noise_std=std,
            model_sha256=model_sha256,
        )
    value = release.values["dice"]
    if sealed and release.mechanism == "gaussian":
        release = sealed_release(config, release)
    try:
        ledger.release(release=release, terms=config.terms)
    except BudgetExceededError:
        return _withheld("the site's privacy budget cannot pay for it")
    return DiceOutcome(value=value, noise_std=std, mechanism=release.mechanism)


def dice_rounds(*, planned_rounds: int, slots: int) -> frozenset[int]:
    """The training rounds whose global model gets a Gaussian Dice release: ``slots`` rounds
    spread evenly from the first to the last planned one (all of them when there are few)."""
    if slots <= 0:
        return frozenset()
    if slots == 1 or planned_rounds <= slots:
        return frozenset(range(1, min(planned_rounds, max(slots, 1)) + 1))
    step = (planned_rounds - 1) / (slots - 1)
    return frozenset(1 + round(k * step) for k in range(slots))


def _withheld(reason: str) -> DiceOutcome:
    return DiceOutcome(value=None, noise_std=None, mechanism=None, withheld=reason)


def _known_counts(
    config: SiteConfig, report: LedgerReport, fingerprint: str, *, sealed: bool
) -> PatientCounts | None:
    """The release of these counts made earlier, if the ledger still holds it and the round
    may use it (a sealed one only where counts are sealed, and only if its values open it)."""
    try:
        known = read_json_object(_patients_path(config))
    except MedfedError:
        known = None
    if not known or known.get("fingerprint") != fingerprint:
        return None
    seq = known.get("seq")
    entry = next((r for r in report.releases if r.seq == seq and r.quantity == "patients"), None)
    if entry is None:
        return None
    if entry.sealed is not None and not sealed:
        return None
    values = opened(config, entry)
    if values is None:
        return None
    return PatientCounts(
        train=int(values["train"]),
        validation=int(values["validation"]),
        seq=entry.seq,
        sealed=entry.sealed is not None,
    )


def _write_known(config: SiteConfig, fingerprint: str, seq: int) -> None:
    path = _patients_path(config)
    make_private_dirs(path.parent)
    data = json.dumps({"fingerprint": fingerprint, "seq": seq}).encode("utf-8")
    replace_file(path, data, mode=0o600)


def sealed_release(config: SiteConfig, release: Release) -> Release:
    """``release`` sealed: its values kept at the site (before its entry is written, so none is
    lost), the commitment to them in their place."""
    kept = seal(release.values)
    path = _sealed_path(config)
    make_private_dirs(path.parent)
    with locked(path, exclusive=True):
        known = read_json_object(path) or {}  # a damaged file stops here, never overwritten
        known[kept.commitment] = {"values": dict(kept.values), "salt": kept.salt}
        replace_file(path, json.dumps(known, sort_keys=True).encode("utf-8"), mode=0o600)
    return dataclasses.replace(release, values={}, sealed=kept.commitment)


def opened(config: SiteConfig, entry: ReleaseEntry) -> Mapping[str, float] | None:
    """A release entry's values: in the entry, or for a sealed one as the site kept them, if
    they open its commitment (None, with a warning, when they are lost or do not)."""
    if entry.sealed is None:
        return entry.values
    try:
        kept = (read_json_object(_sealed_path(config)) or {}).get(entry.sealed)
    except MedfedError:
        kept = None
    values = kept.get("values") if isinstance(kept, dict) else None
    salt = kept.get("salt") if isinstance(kept, dict) else None
    if (
        isinstance(values, dict)
        and isinstance(salt, str)
        and set(values) == set(QUANTITIES[entry.quantity])
        and opens(commitment=entry.sealed, values=values, salt=salt)
    ):
        return {name: float(value) for name, value in values.items()}
    log.warning(
        "site %s: no kept values open the commitment of sealed release seq %d",
        config.site_id,
        entry.seq,
    )
    return None


def _patients_path(config: SiteConfig) -> Path:
    return config.paths.workdir / "releases" / _PATIENTS_FILE


def _sealed_path(config: SiteConfig) -> Path:
    return config.paths.workdir / "releases" / _SEALED_FILE


def _gaussian(count: int, std: float) -> list[float]:
    """``count`` independent N(0, std^2) draws from the CSPRNG."""
    import torch

    from medfed.site.noise import CsprngGaussian

    noise = CsprngGaussian().normal(
        shape=(count,), std=std, dtype=torch.float64, device=torch.device("cpu")
    )
    return [float(value) for value in noise]
