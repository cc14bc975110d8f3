"""`medfed provision`: create the federation's CA, the SuperLink certificate and the site kits.

``cryptography`` and the provisioning code are imported inside the command so that
``medfed --help`` stays fast. Only paths, public keys' fingerprints and commands are printed,
never key material.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from medfed.transport.provision import Workspace


def provision(
    out: Annotated[
        Path, typer.Option("--out", help="Workspace directory to create (new or empty).")
    ],
    sites: Annotated[
        str, typer.Option("--sites", help="Comma-separated site ids, e.g. hospital-a,hospital-b.")
    ],
    host: Annotated[
        str,
        typer.Option("--host", help="The aggregator's address as the sites dial it (DNS or IP)."),
    ] = "127.0.0.1",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing workspace (new CA and keys; every site needs its new kit). "
            "Refused if the workspace holds ledger/, ledgers/ or state/.",
        ),
    ] = False,
) -> None:
    """Create a CA, the SuperLink's TLS certificate and one kit per site."""
    from medfed.transport.provision import parse_sites, provision_workspace

    workspace = provision_workspace(out=out, sites=parse_sites(sites), host=host, force=force)
    typer.echo(describe(workspace))


def describe(workspace: Workspace) -> str:
    """The workspace layout and the next steps, as printed after provisioning."""
    m = workspace.manifest
    root = workspace.root

    def at(relative: str) -> str:
        return shlex.quote(str(root / relative))

    lines = [
        f"Workspace created in {root}",
        f"  {'workspace.yaml':<28} sites, address, public keys (no secrets)",
        f"  {m.ca.key:<28} CA private key (0600): keep offline, never copy to a site",
        f"  {m.ca.cert:<28} CA certificate",
        f"  {'superlink/':<28} server.key (0600), server.crt, ca.crt for the aggregator",
        f"  TLS certificate valid until {m.certificate_not_after.isoformat()}",
    ]
    for site in m.sites:
        lines.append(f"  {site.kit + '/':<28} kit for {site.site_id} (key {site.fingerprint})")
    lines += [
        "",
        "Next steps:",
        "  1. On the aggregator, start the SuperLink with TLS and node authentication (it "
        "listens on 127.0.0.1 unless given --host; expose only /v1/fleet/* through a proxy):",
        f"       flower-superlink --port {m.port} --ssl-ca-certfile {at(m.superlink.ca_cert)} \\",
        f"         --ssl-certfile {at(m.superlink.cert)} --ssl-keyfile {at(m.superlink.key)} \\",
        "         --enable-supernode-auth",
        "  2. Register every site's public node key (CONNECTION: your SuperLink connection in "
        "$FLWR_HOME/config.toml):",
    ]
    lines += [
        f"       flwr supernode register {at(site.node_public_key_file)} CONNECTION"
        for site in m.sites
    ]
    lines += [
        "  3. Copy each sites/<site>/ kit to its hospital over a secure channel (it holds that "
        "site's private node key), and fill in site.template.yaml there.",
        "  4. At each site, start the SuperNode from inside its kit:",
        f"       flower-supernode --superlink {m.address} --root-certificates ca.crt \\",
        "         --auth-supernode-private-key node_key",
    ]
    return "\n".join(lines)
