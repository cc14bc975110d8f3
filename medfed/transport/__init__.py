"""Transport: everything between a site and the aggregator.

Provisioning (CA, TLS certificates, node and ledger keys), the one conversion of medfed values to
Flower records (:mod:`~medfed.transport.envelope`), the in-process Grid, and the launcher of the
real deployment (SuperLink, SuperNodes, `flwr` commands). Training code is only imported lazily,
by the in-process runner.
"""

from medfed.transport.certs import check_certificate
from medfed.transport.provision import (
    SUPERLINK_PORT,
    SiteEntry,
    Workspace,
    WorkspaceManifest,
    load_workspace,
    provision_workspace,
)

__all__ = [
    "SUPERLINK_PORT",
    "SiteEntry",
    "Workspace",
    "WorkspaceManifest",
    "check_certificate",
    "load_workspace",
    "provision_workspace",
]
