"""Transport: provisioning of the Flower deployment (CA, TLS certificates, node keys).

The Flower app glue and the deployment launcher will live here too; this package never imports
training code.
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
