"""The MLflow experiment medfed logs to, created (or completed) with the tags the UI reads.

MLflow 3 sorts experiments into kinds by the ``mlflow.experimentKind`` tag:
``custom_model_development`` (the UI's "Machine learning" / "Model training") or
``genai_development`` (traces, the "Detect issues" pop-up). A federation is model training, so
the experiment is created with that kind and with a description (``mlflow.note.content``); an
experiment that already exists gets whichever of the two it lacks, and keeps a kind someone chose.

MLflow 3.17's own UI decides its view from the address instead (``workflowType``, see
:mod:`medfed.tracking.ui_links`); the tag is what the experiment says of itself, for the clients
and UI versions that read it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from medfed.tracking.descriptions import EXPERIMENT_DESCRIPTION, NOTE_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("medfed.tracking")

EXPERIMENT_KIND_TAG: Final = "mlflow.experimentKind"
MODEL_TRAINING_KIND: Final = "custom_model_development"


def experiment_tags() -> dict[str, str]:
    """The tags a medfed experiment is created with."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, NOTE_TAG: EXPERIMENT_DESCRIPTION}


def ensure_experiment(client: MlflowClient, *, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``: created (or restored from deletion) when needed, and given
    the kind and description tags it lacks."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(
                client.create_experiment(
                    name, artifact_location=artifact_location, tags=experiment_tags()
                )
            )
        except MlflowException:  # another process created it in between
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    present = dict(found.tags or {})
    missing = {k: v for k, v in experiment_tags().items() if not present.get(k)}
    try:
        for key, value in missing.items():
            client.set_experiment_tag(found.experiment_id, key, value)
    except MlflowException as exc:  # e.g. a server user may log runs but not edit experiments
        log.warning("cannot tag MLflow experiment %r (%s); its runs are logged anyway", name, exc)
    return str(found.experiment_id)
