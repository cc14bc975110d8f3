"""Plan a study's privacy before running it: noise multiplier from epsilon, and the other way.

The planner lays out DP-SGD exactly as each site's trainer does
(:func:`medfed.privacy.plan_sampling`): Poisson rate ``q = batch_size / dataset_size`` and
``floor(1 / q)`` steps per epoch, every round recorded in the ledger as
``epochs_per_round x steps_per_epoch`` steps, and all rounds composed in one accountant as the
site's ledger is. So the epsilon planned here is the epsilon the sites' ledgers will show after
``rounds`` rounds, when the site starts from an empty ledger.

``dataset_size`` is a site's number of *training* patients: the validation split (about 20%,
see ``data.val_fraction`` and the manifest's ``split`` column) takes no part in DP-SGD. In a
federation the smallest site samples each patient most often and so spends the most: plan for
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfed.errors import PrivacyError
from medfed.privacy.accounting import AccountantName, DPSteps

#: The recipe :func:`recommend_recipe` recommends: the best measured so far.
RECOMMENDED_PRESET = "dp-fedadam-cosine"
#: The recipe it improves on, measured at more settings: where the recommended one has no
#: measurement near a setting and this one has a nearer one, the estimate is this one's.
EARLIER_PRESET = "dp-fedadam-one-step"
#: Beyond this distance from every measurement (log2 units of patients and epsilon: 1 is a
#: factor of two in either) the expected ratio is called a guess from the nearest one.
NEAR = 0.5


def _history(
    *,
    dataset_size: int,
    batch_size: int,
    epochs_per_round: int,
    rounds: int,
    noise_multiplier: float,
) -> list[DPSteps]:
    from medfed.privacy.sampling import plan_sampling

    _check_count("epochs_per_round", epochs_per_round)
    _check_count("rounds", rounds)
    plan = plan_sampling(dataset_size=dataset_size, batch_size=batch_size, epochs=epochs_per_round)
    one_round = DPSteps(
        noise_multiplier=noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps
    )
    return [one_round] * rounds


def plan_epsilon(
    *,
    dataset_size: int,
    batch_size: int,
    epochs_per_round: int,
    rounds: int,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """The epsilon at ``delta`` a site spends over ``rounds`` rounds at ``noise_multiplier``.

    ``dataset_size`` is the site's number of training patients (see the module docstring).
    """
    from medfed.privacy.accounting import compute_epsilon

    history = _history(
        dataset_size=dataset_size,
        batch_size=batch_size,
        epochs_per_round=epochs_per_round,
        rounds=rounds,
        noise_multiplier=noise_multiplier,
    )
    return compute_epsilon(history=history, delta=delta, accountant=accountant)


def plan_noise(
    *,
    dataset_size: int,
    batch_size: int,
    epochs_per_round: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """The smallest noise multiplier with which ``rounds`` rounds stay within ``target_epsilon``.

    Its epsilon (:func:`plan_epsilon` with the same arguments) is at most ``target_epsilon``
    and within 0.01 of it. ``dataset_size`` is the site's number of training patients (see
    the module docstring). Raises :class:`~medfed.errors.PrivacyError` for a target no noise
    can reach.
    """
    from medfed.privacy.accounting import noise_for_target_epsilon
    from medfed.privacy.sampling import plan_sampling

    _check_count("epochs_per_round", epochs_per_round)
    _check_count("rounds", rounds)
    plan = plan_sampling(dataset_size=dataset_size, batch_size=batch_size, epochs=epochs_per_round)
    # Same (noise, rate) every round: the composition is that of one run of all the steps.
    return noise_for_target_epsilon(
        target_epsilon=target_epsilon,
        sample_rate=plan.sample_rate,
        steps=plan.steps * rounds,
        delta=delta,
        accountant=accountant,
    )


def _check_count(
    name: str,
    value: int,
    hint: str = "a study plans at least one round of at least one local epoch",
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(f"{name} must be an integer of at least 1, got {value!r}", hint=hint)


@dataclass(frozen=True, kw_only=True)
class DiceEstimate:
    """The expected federated-DP / centralised-non-private Dice ratio, and what it rests on."""

    ratio: float
    low: float
    high: float
    measured_at: str  # the measured setting it comes from
    source: str
    distance: float  # from the measured setting (log2 of patients and epsilon)
    recipe: str  # the recipe that was measured

    @property
    def note(self) -> str:
        """How far to trust it, in words."""
        if self.distance <= NEAR:
            where = "measured at a setting close to this one"
        else:
            where = (
                "no measurement near this setting: the nearest one's ratio; more patients per "
                "site or a larger epsilon usually raise it, fewer or a smaller one lower it"
            )
        if self.recipe != RECOMMENDED_PRESET:
            where += (
                f"; measured with the earlier recipe {self.recipe}, which measured lower than "
                f"{RECOMMENDED_PRESET} where both were measured"
            )
        return f"an estimate on synthetic data, {where}"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A recommended training recipe for a federation's sizes and per-site epsilon cap."""

    preset: str
    patients_per_site: int
    sites: int
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    epsilon: float  # what the plan spends at a site of ``patients_per_site`` (<= target)
    sample_rate: float
    batch_size: int
    rounds: int
    local_epochs: int
    steps_per_round: int
    run_settings: Mapping[str, Any] = field(default_factory=dict)
    site_settings: Mapping[str, Any] = field(default_factory=dict)
    expected_dice_ratio: DiceEstimate | None = None

    def to_json(self) -> dict[str, Any]:
        estimate = self.expected_dice_ratio
        return {
            "preset": self.preset,
            "patients_per_site": self.patients_per_site,
            "sites": self.sites,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "batch_size": self.batch_size,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "steps_per_round": self.steps_per_round,
            "run_settings": dict(self.run_settings),
            "site_settings": dict(self.site_settings),
            "expected_dice_ratio": None
            if estimate is None
            else {
                "estimate": estimate.ratio,
                "low": estimate.low,
                "high": estimate.high,
                "measured_at": estimate.measured_at,
                "recipe": estimate.recipe,
                "source": estimate.source,
                "note": estimate.note,
            },
        }


def recommend_recipe(
    *,
    patients_per_site: int,
    sites: int,
    target_epsilon: float,
    rounds: int | None = None,
    delta: float = 1e-5,
    accountant: AccountantName = "rdp",
) -> Recipe:
    """The recipe that measured best, planned for these sizes and this per-site cap.

    The ``dp-fedadam-cosine`` preset: every round one full-batch DP-SGD step at each site
    (sample rate 1, batch = the site's training patients), FedAdam on the aggregate with its
    rate decaying along a cosine, and the noise planned so that ``rounds`` rounds (the preset's
    160 by default) spend at most ``target_epsilon`` at a site with ``patients_per_site``
    training patients (plan for the smallest site). The expected Dice ratio is the nearest
    measurement of :data:`medfed.api.measured_utility.MEASURED` (:func:`expected_ratio`), an
    estimate.
    """
    from medfed.config.strategy import PRESETS

    _check_count("patients_per_site", patients_per_site, "the smallest site's training patients")
    _check_count("sites", sites, "the number of sites in the federation")
    preset = PRESETS[RECOMMENDED_PRESET]
    rounds = int(preset.run["rounds"]) if rounds is None else rounds
    _check_count("rounds", rounds)
    local_epochs = int(preset.run["local_epochs"])
    batch = patients_per_site  # sample rate 1: every patient in every step
    noise = plan_noise(
        dataset_size=patients_per_site,
        batch_size=batch,
        epochs_per_round=local_epochs,
        rounds=rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
    )
    spent = plan_epsilon(
        dataset_size=patients_per_site,
        batch_size=batch,
        epochs_per_round=local_epochs,
        rounds=rounds,
        noise_multiplier=noise,
        delta=delta,
        accountant=accountant,
    )
    return Recipe(
        preset=RECOMMENDED_PRESET,
        patients_per_site=patients_per_site,
        sites=sites,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
        noise_multiplier=noise,
        epsilon=spent,
        sample_rate=1.0,
        batch_size=batch,
        rounds=rounds,
        local_epochs=local_epochs,
        steps_per_round=1,
        run_settings={
            "strategy": {"preset": RECOMMENDED_PRESET},
            "rounds": rounds,
            "noise_multiplier": noise,
            "min_sites": sites,
        },
        site_settings={
            "training.optimizer": preset.site["training.optimizer"],
            "training.batch_size": batch,
            "privacy.epsilon_cap": target_epsilon,
            "privacy.delta": delta,
            # the policy's default (50) refuses longer runs
            "policy.max_rounds_per_run": max(rounds, 50),
        },
        expected_dice_ratio=expected_ratio(
            patients_per_site=patients_per_site, epsilon=target_epsilon
        ),
    )


def expected_ratio(*, patients_per_site: int, epsilon: float) -> DiceEstimate | None:
    """The recommended recipe's nearest measurement, or the earlier recipe's where that one is
    measured nearer to the setting and the recommended one has nothing near it."""
    from medfed.api.measured_utility import nearest_measurement

    found = nearest_measurement(
        patients_per_site=patients_per_site, epsilon=epsilon, recipe=RECOMMENDED_PRESET
    )
    if found is None or found[1] > NEAR:
        earlier = nearest_measurement(
            patients_per_site=patients_per_site, epsilon=epsilon, recipe=EARLIER_PRESET
        )
        if earlier is not None and (found is None or earlier[1] < found[1]):
            found = earlier
    if found is None:
        return None
    row, distance = found
    return DiceEstimate(
        ratio=row.ratio,
        low=row.low,
        high=row.high,
        measured_at=f"{row.sites} sites x {row.patients_per_site} training patients, "
        f"epsilon {row.epsilon:g} at delta {row.delta:g}, {row.runs} runs ({row.task})",
        source=row.source,
        distance=distance,
        recipe=row.recipe,
    )
