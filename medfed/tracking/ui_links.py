"""Where to look at a run in the MLflow UI: the command that starts it, and the pages' addresses.

For a SQLite store the UI is started by hand (``mlflow ui --backend-store-uri sqlite:///...``)
and answers on ``http://127.0.0.1:<port>``; a tracking server is its own UI, at its own URL
(given without the user name, password or query the tracking URI may carry). Other database
stores (PostgreSQL, MySQL) carry credentials in their URI: no command is made for them.

MLflow 3.17's UI opens an experiment in the view that the address's ``workflowType`` names, else
in the one the browser last used, "GenAI" (traces) by default, whatever the experiment's kind
tag says. So every address below asks for the model-training view: the experiment's page opens
on its runs, not on an empty traces overview. Nothing here imports MLflow.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

from medfed.logs import redact_secrets
from medfed.tracking.info import TrackingInfo, read_tracking_info
from medfed.tracking.uri import is_server, sqlite_path
from medfed.workspace import RunPaths

DEFAULT_UI_HOST: Final = "127.0.0.1"
DEFAULT_UI_PORT: Final = 5000
MODEL_TRAINING_VIEW: Final = "workflowType=machine_learning"


@dataclass(frozen=True)
class UiLinks:
    """How to open a tracked run in the MLflow UI; None where there is no such thing."""

    command: str | None  # starts a UI on the store (None: a server, or no local store)
    experiment: str | None  # the experiment's runs
    run: str | None  # the parent run


def ui_command(*, tracking_uri: str, port: int = DEFAULT_UI_PORT) -> str | None:
    """``mlflow ui --backend-store-uri sqlite:////abs/mlflow.db``, ready to paste in a shell.

    None for a tracking server (it is its own UI: :func:`ui_base_url`) and for stores whose URI
    would put credentials on a command line.
    """
    if sqlite_path(tracking_uri) is None:
        return None
    words = ["mlflow", "ui", "--backend-store-uri", redact_secrets(tracking_uri)]
    if port != DEFAULT_UI_PORT:
        words += ["--port", str(port)]
    return shlex.join(words)


def ui_base_url(*, tracking_uri: str, port: int = DEFAULT_UI_PORT) -> str | None:
    """The UI's address, ending in ``/``: the server itself, or where ``mlflow ui`` answers.

    A server's user name, password, query and fragment are left out.
    """
    if is_server(tracking_uri):
        parts = urlsplit(tracking_uri)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        path = parts.path.rstrip("/") + "/"
        return urlunsplit((parts.scheme, netloc, path, "", ""))
    if sqlite_path(tracking_uri) is None:
        return None
    return f"http://{DEFAULT_UI_HOST}:{port}/"


def experiment_url(
    *, tracking_uri: str, experiment_id: str, port: int = DEFAULT_UI_PORT
) -> str | None:
    """The experiment's runs in the UI (model-training view)."""
    base = ui_base_url(tracking_uri=tracking_uri, port=port)
    if base is None:
        return None
    return f"{base}#/experiments/{_segment(experiment_id)}/runs?{MODEL_TRAINING_VIEW}"


def run_url(
    *, tracking_uri: str, experiment_id: str, run_id: str, port: int = DEFAULT_UI_PORT
) -> str | None:
    """A run's page: ``http://127.0.0.1:5000/#/experiments/<exp>/runs/<run>?workflowType=...``."""
    base = ui_base_url(tracking_uri=tracking_uri, port=port)
    if base is None:
        return None
    page = f"#/experiments/{_segment(experiment_id)}/runs/{_segment(run_id)}"
    return f"{base}{page}?{MODEL_TRAINING_VIEW}"


def model_version_url(
    *, tracking_uri: str, name: str, version: str, port: int = DEFAULT_UI_PORT
) -> str | None:
    """A registered model version's page (its description states the privacy guarantee)."""
    base = ui_base_url(tracking_uri=tracking_uri, port=port)
    if base is None:
        return None
    return f"{base}#/models/{_segment(name)}/versions/{_segment(version)}?{MODEL_TRAINING_VIEW}"


def ui_links(*, info: TrackingInfo, port: int = DEFAULT_UI_PORT) -> UiLinks:
    """The links of a tracked run, from its ``mlflow.json`` (:func:`run_ui_links` reads it)."""
    uri = info.tracking_uri
    return UiLinks(
        command=ui_command(tracking_uri=uri, port=port),
        experiment=experiment_url(tracking_uri=uri, experiment_id=info.experiment_id, port=port),
        run=run_url(
            tracking_uri=uri,
            experiment_id=info.experiment_id,
            run_id=info.parent_run_id,
            port=port,
        ),
    )


def run_ui_links(*, paths: RunPaths, port: int = DEFAULT_UI_PORT) -> UiLinks | None:
    """The links of the run in ``paths``; None when it was not tracked (no ``mlflow.json``)."""
    info = read_tracking_info(paths=paths)
    return None if info is None else ui_links(info=info, port=port)


def _segment(text: str) -> str:
    return quote(text, safe="")
