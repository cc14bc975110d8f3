"""Which MLflow tracking store a federation logs to, and its one-time initialisation.

The URI is, in order: the one given explicitly (``--tracking-uri``, a setting), the
``MLFLOW_TRACKING_URI`` environment variable, or the embedded default
``sqlite:///<absolute workspace>/mlflow.db``. Any MLflow tracking URI works, a tracking server
(``http://``, ``https://``) included; MLflow 3 refuses plain file stores, so they are refused
here with a hint instead of failing later inside the ServerApp.

A fresh SQLite store must be created by one process before several write to it (concurrent
first writers can leave it broken): :func:`prepare_store` does that under a file lock, once,
before the SuperLink starts. MLflow is imported only inside that function.

Opening a store also quiets MLflow's database set-up messages (:func:`quiet_store_logs`): a
user of ``medfed demo`` or ``medfed run`` should not read alembic's migration steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from medfed.errors import ConfigError
from medfed.workspace import MLFLOW_ARTIFACTS, WorkspaceLayout

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Set by `start_aggregator` for the ServerApp: the tracking URI to log runs to.
TRACKING_URI_ENV = "MEDFED_TRACKING_URI"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "medfed"
_SQLITE = "sqlite:///"
# They log at INFO while creating or migrating a database ("Creating initial MLflow database
# tables...", "Context impl SQLiteImpl.").
STORE_SETUP_LOGGERS = ("mlflow.store.db.utils", "alembic")


def mlflow_available() -> bool:
    """True when MLflow can be imported here (it is in the ``aggregator``/``tracking`` extras)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def default_tracking_uri(*, workspace_root: Path) -> str:
    """``sqlite:///<absolute workspace>/mlflow.db`` (four slashes: the path is absolute)."""
    return _SQLITE + str(WorkspaceLayout(root=Path(workspace_root).absolute()).mlflow_db)


def resolve_tracking_uri(
    *,
    workspace_root: Path,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The tracking URI to use: ``explicit`` > ``MLFLOW_TRACKING_URI`` > the workspace SQLite.

    A relative SQLite path is made absolute (the ServerApp runs in another directory).
    """
    env = os.environ if environ is None else environ
    for source, value in (("--tracking-uri", explicit), (MLFLOW_URI_ENV, env.get(MLFLOW_URI_ENV))):
        if value is not None and value.strip():
            return _checked(value.strip(), source=source)
    return default_tracking_uri(workspace_root=workspace_root)


def _checked(uri: str, *, source: str) -> str:
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # a path (one letter: a Windows drive)
        raise ConfigError(
            f"{source} {uri!r}: MLflow 3 does not accept a plain file store",
            hint="use a database (sqlite:////absolute/path/mlflow.db) or a tracking server "
            "(http://host:5000)",
        )
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        query = uri[len(_SQLITE) :].partition("?")[2]
        return _SQLITE + str(path.absolute()) + (f"?{query}" if query else "")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE) :].partition("?")[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


def is_server(uri: str) -> bool:
    """True for a tracking server (REST over HTTP)."""
    return urlsplit(uri).scheme in ("http", "https")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a SQLite store keeps artifacts (None: the store decides)."""
    # Beside the database, never relative to a process' working directory.
    path = sqlite_path(uri)
    return None if path is None else (path.parent / MLFLOW_ARTIFACTS).absolute().as_uri()


def prepare_store(*, uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """Create a SQLite store and ``experiment`` once, under a file lock; the experiment's id.

    Idempotent and safe to call from several processes at once. Does nothing (returns None)
    for other stores: a tracking server initialises its own database, and the federation
    must not wait on a server here. Raises ConfigError when the store cannot be created.
    """
    if sqlite_path(uri) is None:
        return None
    try:
        return open_store(uri=uri, experiment=experiment)[1]
    except Exception as exc:  # SQLAlchemy, MLflow and OS errors all mean the same here
        raise ConfigError(
            f"cannot initialise the MLflow store {uri}: {type(exc).__name__}: {exc}",
            hint="check that the directory is writable, or pass another --tracking-uri",
        ) from None


def open_store(*, uri: str, experiment: str = DEFAULT_EXPERIMENT) -> tuple[MlflowClient, str]:
    """A client of ``uri`` and the id of ``experiment`` in it (created when missing).

    A SQLite store is created under ``<db>.lock`` (``flock``), so that only one process ever
    initialises it. Errors are MLflow's, SQLAlchemy's or the OS's, unchanged.
    """
    from mlflow import MlflowClient

    from medfed.tracking.experiment import ensure_experiment

    quiet_store_logs()  # after the import: importing mlflow configures its loggers
    location = artifact_location(uri)
    path = sqlite_path(uri)
    if path is None:
        client = MlflowClient(tracking_uri=uri)
        return client, ensure_experiment(client, name=experiment, artifact_location=location)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        client = MlflowClient(tracking_uri=uri)
        return client, ensure_experiment(client, name=experiment, artifact_location=location)


def quiet_store_logs() -> None:
    """Raise MLflow's and alembic's database set-up loggers to WARNING (their warnings stay)."""
    for name in STORE_SETUP_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one aggregator per workspace is the rule anyway
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
