"""Create a federation workspace: CA, SuperLink TLS certificate, one kit per site.

Layout (all directories 0700, private keys 0600)::

    workspace.yaml            sites, host, port, paths, public keys, expiry (no private keys)
    ca/ca.key, ca/ca.crt      the federation CA; ca.key never leaves the aggregator's admin
    superlink/                server.key, server.crt, ca.crt for flower-superlink
    aggregator/               receipt_key.pem, receipt_key.pub (signs ledger receipts)
    sites/<site>/             the kit for one hospital: node_key, node_key.pub (Flower node
                              identity), ledger_key.pem, ledger_key.pub (signs the site's
                              privacy ledger), ca.crt, aggregator_receipt.pub,
                              site.template.yaml

The workspace is built in a private staging directory next to ``out`` and renamed into place,
so an interrupted run leaves either the old workspace or the new one, never a mix.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.errors import ConfigError
from medfed.privacy.keys import key_id, load_or_create_signing_key
from medfed.storage import fsync_dir, make_private_dirs, replace_file
from medfed.transport import certs
from medfed.workspace import (
    PROTECTED_DIRS,
    RECEIPT_KEY_FILE,
    SITE_ID_PATTERN,
    WORKSPACE_FILE,
    CaPaths,
    ReceiptKeyPaths,
    SiteEntry,
    SuperlinkPaths,
    Workspace,
    WorkspaceManifest,
    spki_pem,
)

# flwr 1.41's SuperLink serves HTTPS on one port (`--port`, 8000 by default; `--host` defaults
# to 127.0.0.1) for the Fleet, Control and Runtime APIs together; older releases used separate
# gRPC ports. Because the Control API shares this port and has no login, hospitals should reach
# it only through a proxy that forwards /v1/fleet/*.
SUPERLINK_PORT = 8000


def parse_sites(text: str) -> list[str]:
    """Split a comma-separated ``--sites`` value; empty items are kept so they get reported."""
    return [item.strip() for item in text.split(",")]


def validate_site_ids(sites: Sequence[str]) -> list[str]:
    """Return the ids if all are valid; otherwise one :class:`ConfigError` naming every bad one."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for site in sites:
        if not SITE_ID_PATTERN.match(site):
            problems.append(f"{site!r} is not a valid site id")
            continue
        # Case-insensitive: kits are directories, and some file systems fold case.
        folded = site.casefold()
        if folded in seen:
            problems.append(f"{site!r} duplicates {seen[folded]!r}")
        else:
            seen[folded] = site
    if not sites:
        problems.append("no sites given")
    if problems:
        raise ConfigError(
            "bad site ids: " + "; ".join(problems),
            hint="give unique ids of letters, digits, '_', '.', '-' (at most 63, starting with a "
            "letter or digit), comma separated: --sites hospital-a,hospital-b",
        )
    return list(sites)


def superlink_address(host: str, port: int = SUPERLINK_PORT) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def provision_workspace(
    *,
    out: Path,
    sites: Sequence[str],
    host: str,
    port: int = SUPERLINK_PORT,
    valid_days: int = 365,
    force: bool = False,
    now: dt.datetime | None = None,
) -> Workspace:
    """Create a workspace in ``out`` (which must be missing or empty).

    With ``force`` an existing *workspace* (a directory with ``workspace.yaml``) is replaced as
    a whole, CA included; any other non-empty directory, and a workspace that holds
    ``ledger``/``ledgers``/``state`` directories, is refused, so that no federation history and
    no unrelated files are ever deleted. Nothing secret is printed or logged. ``port`` is the
    SuperLink's one HTTPS port, written into the manifest and every site's template.
    """
    if isinstance(sites, str):  # a str is a Sequence[str] of characters: catch the slip early
        raise ConfigError("sites must be a list of ids", hint="use parse_sites('a,b') first")
    site_ids = validate_site_ids(sites)
    host = host.strip()
    certs.parse_host(host)  # fail on a bad host before anything is created
    if valid_days < 1:
        raise ConfigError(f"valid_days must be at least 1, not {valid_days}")
    if not 1 <= port <= 65535:
        raise ConfigError(f"port must be between 1 and 65535, not {port}")
    out = Path(out).absolute()
    _check_target(out, force=force)
    moment = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    staging = out.with_name(f".{out.name}.provision-{secrets.token_hex(6)}")
    make_private_dirs(out.parent)
    make_private_dirs(staging)
    try:
        manifest = _build(
            staging, site_ids=site_ids, host=host, port=port, now=moment, days=valid_days
        )
        _swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Workspace(root=out, manifest=manifest)


def _check_target(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory", hint="choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(
            f"{out} is not empty",
            hint="choose an empty or new directory, or pass --force to replace an existing "
            "workspace (its CA and all keys are replaced; every site needs its new kit)",
        )
    if not (out / WORKSPACE_FILE).is_file():
        raise ConfigError(
            f"{out} is not empty and is not a medfed workspace (no {WORKSPACE_FILE})",
            hint="--force only replaces a workspace made by `medfed provision`; choose another "
            "--out",
        )
    kept = [name for name in PROTECTED_DIRS if (out / name).exists()]
    if kept:
        raise ConfigError(
            f"{out} holds federation history ({', '.join(kept)}); refusing to replace it",
            hint="move those directories somewhere safe first, or provision into a new --out",
        )


def _build(
    root: Path, *, site_ids: list[str], host: str, port: int, now: dt.datetime, days: int
) -> WorkspaceManifest:
    ca = certs.make_ca(now=now, valid_days=days, common_name=f"medfed federation CA {host}")
    server = certs.make_server_cert(ca=ca, host=host, now=now, valid_days=days)
    ca_pem = certs.cert_pem(ca.cert)
    address = superlink_address(host, port)

    make_private_dirs(root / "ca")
    _write(root / "ca/ca.key", certs.private_pem(ca.key), secret=True)
    _write(root / "ca/ca.crt", ca_pem)

    make_private_dirs(root / "superlink")
    _write(root / "superlink/server.key", certs.private_pem(server.key), secret=True)
    _write(root / "superlink/server.crt", certs.cert_pem(server.cert))
    _write(root / "superlink/ca.crt", ca_pem)

    receipt_key = load_or_create_signing_key(root / "aggregator/receipt_key.pem")
    receipt_public = spki_pem(receipt_key.public_key())

    make_private_dirs(root / "sites")
    entries: list[SiteEntry] = []
    for site_id in site_ids:
        kit = f"sites/{site_id}"
        node = certs.make_node_key()
        make_private_dirs(root / kit)
        _write(root / kit / "node_key", node.private_openssh, secret=True)
        _write(root / kit / "node_key.pub", (node.public_openssh + "\n").encode("ascii"))
        _write(root / kit / "ca.crt", ca_pem)
        _write(root / kit / RECEIPT_KEY_FILE, receipt_public)
        # The same files medfed.privacy.keys.load_or_create_signing_key writes and loads.
        ledger_key = Ed25519PrivateKey.generate()
        ledger_pem = ledger_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(root / kit / "ledger_key.pem", ledger_pem, secret=True)
        _write(root / kit / "ledger_key.pub", spki_pem(ledger_key.public_key()))
        template = site_template(site_id=site_id, address=address, created_at=now)
        _write(root / kit / "site.template.yaml", template.encode("utf-8"))
        entries.append(
            SiteEntry(
                site_id=site_id,
                kit=kit,
                node_key=f"{kit}/node_key",
                node_public_key_file=f"{kit}/node_key.pub",
                public_key=node.public_openssh,
                fingerprint=node.fingerprint,
                ledger_public_key_file=f"{kit}/ledger_key.pub",
                ledger_key_id=key_id(ledger_key.public_key()),
            )
        )

    manifest = WorkspaceManifest(
        created_at=now,
        host=host,
        port=port,
        address=address,
        ca=CaPaths(cert="ca/ca.crt", key="ca/ca.key"),
        superlink=SuperlinkPaths(
            cert="superlink/server.crt", key="superlink/server.key", ca_cert="superlink/ca.crt"
        ),
        certificate_not_after=server.cert.not_valid_after_utc,
        sites=entries,
        receipts=ReceiptKeyPaths(
            key="aggregator/receipt_key.pem",
            public_key_file="aggregator/receipt_key.pub",
            key_id=key_id(receipt_key.public_key()),
        ),
    )
    header = "# medfed federation workspace (written by `medfed provision`; public data only)\n"
    body = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False)
    _write(root / WORKSPACE_FILE, (header + body).encode("utf-8"))
    return manifest


def site_template(*, site_id: str, address: str, created_at: dt.datetime) -> str:
    """The commented ``site.template.yaml`` of one site's kit."""
    # Values go through JSON quoting, a subset of YAML: an id like "1e5" or "null" stays a string.
    q = _quote
    return f"""\
# medfed site configuration for site {q(site_id)}
# Made by `medfed provision` on {created_at.isoformat()}. Copy this kit directory to the site's
# node, rename this file to site.yaml, replace every CHANGE-ME, then run
# `medfed data check --config site.yaml`.
site_id: {q(site_id)}

transport:
  # The aggregator's Flower SuperLink (one HTTPS port for Fleet, Control and Runtime APIs).
  superlink_address: {q(address)}
  # CA that signed the SuperLink's certificate: flower-supernode --root-certificates
  root_certificates: ca.crt
  # This node's identity key: flower-supernode --auth-supernode-private-key
  # Private: keep it mode 0600 on this machine only. The aggregator registers node_key.pub.
  node_private_key: node_key
  node_public_key: node_key.pub
  # The aggregator signs a receipt of the ledger entries it holds with this key's private
  # half; the site checks it before every round, so a restored old ledger is refused.
  receipt_public_key: aggregator_receipt.pub
  # One worker keeps torch, MONAI and Opacus imported and forks the ClientApp of each message,
  # checked by the app guard like a cold one; false starts a fresh process per message.
  warm_worker: true

data:
  # CSV or YAML manifest of this site's patients: patient_id, image, label[, split]
  manifest: CHANGE-ME/manifest.csv

privacy:
  # Agreed with the federation before the first round; the site refuses rounds beyond the cap.
  noise_multiplier: 1.0   # CHANGE-ME
  max_grad_norm: 1.0      # CHANGE-ME
  delta: 1.0e-5           # CHANGE-ME: below 1 / number of patients
  epsilon_cap: 8.0        # CHANGE-ME: lifetime cap at delta
  accountant: rdp

paths:
  # Work directory on local disk: checkpoints, cache, and the privacy ledger (back it up).
  workdir: CHANGE-ME/medfed-work
  # Signs this site's privacy ledger. Private: keep it mode 0600 and back it up with the
  # ledger (a new key cannot continue an existing ledger). The aggregator verifies the
  # ledger with the public half registered in its workspace (ledger_key.pub).
  signing_key: ledger_key.pem
"""


def _quote(value: str) -> str:
    return json.dumps(value)


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    # replace_file creates the temporary file with the final mode, so a private key is never
    # readable by others, not even for an instant.
    replace_file(path, data, mode=0o600 if secret else 0o644)


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        # _check_target allowed this: either an empty directory or a replaceable workspace.
        retired = out.with_name(f".{out.name}.old-{secrets.token_hex(6)}")
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired)
    else:
        os.replace(staging, out)
    fsync_dir(out.parent)
