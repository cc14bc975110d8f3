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
    from medfed.workspace import Workspace


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
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="The SuperLink's HTTPS port.")
    ] = 8000,
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

    workspace = provision_workspace(
        out=out, sites=parse_sites(sites), host=host, port=port, force=force
    )
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
        f"  1. On the aggregator: medfed aggregator start --workspace {shlex.quote(str(root))}",
        "     (the SuperLink with TLS and node authentication; it registers every site's node "
        "key; expose only /v1/fleet/* to hospitals through a proxy)",
        "  2. Copy each sites/<site>/ kit to its hospital over a secure channel (it holds that "
        "site's private node key and ledger key; sites/README.md in medfed's sources says how "
        "to run a node as a service).",
        "  3. At each site: medfed site init --kit KIT --data MANIFEST --out site.yaml, then "
        "medfed site check --config site.yaml, then medfed site start --config site.yaml",
        f"  4. Submit a run: medfed run --workspace {shlex.quote(str(root))} --name NAME",
    ]
    return "\n".join(lines)
