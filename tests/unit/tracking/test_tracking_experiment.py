"""The experiment says it is model training, and opening a store prints no database chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medfed.tracking import default_tracking_uri, prepare_store
from medfed.tracking.descriptions import EXPERIMENT_DESCRIPTION
from medfed.tracking.experiment import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from medfed.tracking.uri import open_store

NOTE = "mlflow.note.content"


def test_a_new_experiment_is_model_training_with_a_description(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path)
    experiment_id = prepare_store(uri=uri)
    assert experiment_id is not None
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == MODEL_TRAINING_KIND
    assert tags[NOTE] == EXPERIMENT_DESCRIPTION


def test_an_older_experiment_gets_the_tags_it_lacks_and_keeps_the_rest(tmp_path: Path) -> None:
    uri = default_tracking_uri(workspace_root=tmp_path)
    client = MlflowClient(tracking_uri=uri)
    bare = client.create_experiment("medfed")  # as medfed before these tags made it
    described = client.create_experiment("mine", tags={NOTE: "my own words"})
    genai = client.create_experiment("agents", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    assert open_store(uri=uri)[1] == bare
    assert open_store(uri=uri, experiment="mine")[1] == described
    assert open_store(uri=uri, experiment="agents")[1] == genai
    tags = {e: client.get_experiment(e).tags for e in (bare, described, genai)}
    assert tags[bare][EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert tags[bare][NOTE] == EXPERIMENT_DESCRIPTION
    assert tags[described][NOTE] == "my own words"
    assert tags[described][EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert tags[genai][EXPERIMENT_KIND_TAG] == "genai_development"  # someone's choice stands


def _first_open(uri: str, code: str) -> str:
    """stderr of a fresh process that opens ``uri`` (a new database) with ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code, uri],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stderr


@pytest.mark.slow
def test_creating_a_store_prints_no_mlflow_or_alembic_info_lines(tmp_path: Path) -> None:
    # Without medfed, MLflow announces the tables it creates: what the demo printed.
    plain = _first_open(
        default_tracking_uri(workspace_root=tmp_path / "plain"),
        "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).get_experiment_by_name('x')",
    )
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables" in plain
    quiet = _first_open(
        default_tracking_uri(workspace_root=tmp_path / "quiet"),
        "import sys; from medfed.tracking import prepare_store; prepare_store(uri=sys.argv[1])",
    )
    assert (tmp_path / "quiet" / "mlflow.db").is_file()
    assert "mlflow.store.db.utils" not in quiet and "alembic" not in quiet, quiet
    assert " INFO " not in quiet, quiet
