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

from medfed.errors import PrivacyError
from medfed.privacy.accounting import AccountantName, DPSteps


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


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrivacyError(
            f"{name} must be an integer of at least 1, got {value!r}",
            hint="a study plans at least one round of at least one local epoch",
        )
