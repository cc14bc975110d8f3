"""MLflow tracking of federation runs (the aggregator's side).

One parent run per federation run and one nested child run per site, fed from the events of
:func:`medfed.aggregator.federation.run_federation` by
:class:`~medfed.tracking.tracker.FederationTracker`. Every MLflow call goes through a buffer
that retries with short timeouts, so a tracking server outage neither loses a run nor hangs the
federation.

This package's ``__init__`` and :mod:`medfed.tracking.uri` import no MLflow at module level:
the CLI and the ServerApp stay fast to import and work where MLflow is not installed.
"""

from medfed.tracking.uri import (
    DEFAULT_EXPERIMENT,
    TRACKING_URI_ENV,
    default_tracking_uri,
    prepare_store,
    resolve_tracking_uri,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "TRACKING_URI_ENV",
    "default_tracking_uri",
    "prepare_store",
    "resolve_tracking_uri",
]
