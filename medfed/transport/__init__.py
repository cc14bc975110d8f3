"""Transport: everything between a site and the aggregator.

Provisioning (CA, TLS certificates, node and ledger keys), the in-process Grid, and the
launcher of the real deployment (SuperLink, SuperNodes, `flwr` commands). The message envelope
(:mod:`medfed.envelope`) and the workspace (:mod:`medfed.workspace`) are on the ground floor,
shared by site and aggregator. Training code is only imported lazily, by the in-process runner.
"""

from medfed.transport.certs import check_certificate
from medfed.transport.provision import SUPERLINK_PORT, provision_workspace

__all__ = ["SUPERLINK_PORT", "check_certificate", "provision_workspace"]
