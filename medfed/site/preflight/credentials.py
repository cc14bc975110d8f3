"""The site's configuration, its private keys and the CA certificate it trusts."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from medfed.config.site import SiteConfig, TransportSection
from medfed.errors import MedfedError
from medfed.site.preflight.result import CheckResult, _fail, _pass, _warn

CERT_WARN_DAYS = 30


def check_config(path: Path) -> tuple[CheckResult, SiteConfig | None]:
    """Load the site config; the FAIL line carries the loader's first problem."""
    from medfed.config import load_site_config

    try:
        config = load_site_config(path)
    except MedfedError as exc:
        lines = exc.message.splitlines()
        detail = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[1]}"
        return _fail("config", detail, exc.hint or "fix the site config"), None
    return _pass("config", f"{path} is valid (site {config.site_id})"), config


def check_key_permissions(path: Path) -> str | None:
    """What is wrong with the file mode of a private key, or None if only its owner reads it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"{path} is readable by {'others' if mode & stat.S_IROTH else 'its group'}"
    return None


def check_node_key(transport: TransportSection) -> CheckResult:
    """The node's private key: readable, an EC P-384 OpenSSH key, private, matching its .pub."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    name = "node key"
    path = transport.node_private_key
    kit_fix = "copy node_key and node_key.pub from the site's kit made by `medfed provision`"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _fail(name, f"{path}: cannot read ({exc.strerror})", kit_fix)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        return _fail(name, f"{path}: not an unencrypted OpenSSH private key ({exc})", kit_fix)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        return _fail(name, f"{path}: not an EC P-384 key (Flower requires one)", kit_fix)
    problem = check_key_permissions(path)
    if problem is not None:
        return _fail(name, problem, f"chmod 600 {path}")
    try:
        public = serialization.load_ssh_public_key(transport.node_public_key.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return _warn(name, f"{transport.node_public_key}: cannot be read ({exc})", kit_fix)
    if public != key.public_key():
        return _fail(
            name,
            f"{transport.node_public_key} is not the public half of {path}",
            kit_fix + "; the aggregator registered the .pub of the kit",
        )
    return _pass(name, f"{path}: EC P-384, mode {_mode(path)}, matches node_key.pub")


def check_ledger_key(config: SiteConfig) -> CheckResult:
    """The ledger signing key: present (or legitimately still to be made) and private."""
    name = "ledger key"
    path = config.signing_key_path
    if not path.exists():
        if config.ledger_path.exists():
            return _fail(
                name,
                f"{path} is missing but the ledger {config.ledger_path} exists",
                "restore the key from backup: a new key cannot continue an existing ledger",
            )
        if config.transport is not None:
            return _fail(
                name,
                f"{path} does not exist; a new key would be made, and the aggregator only "
                "accepts ledgers signed with the kit's key",
                "point paths.signing_key at ledger_key.pem from the site's kit",
            )
        return _warn(name, f"{path} does not exist yet", "it is made at the first training run")
    try:
        path.read_bytes()
    except OSError as exc:
        return _fail(name, f"{path}: cannot read ({exc.strerror})", "run as the key's owner")
    problem = check_key_permissions(path)
    if problem is not None:
        return _fail(name, problem, f"chmod 600 {path}")
    return _pass(name, f"{path}: mode {_mode(path)}")


def check_ca(path: Path, *, now: dt.datetime) -> CheckResult:
    """The CA certificate the node trusts: readable, a CA, valid now and for 30 more days."""
    from cryptography import x509

    name = "CA certificate"
    fix = "copy ca.crt again from the site's kit; if it expired, ask the aggregator's admin "
    fix += "to re-provision"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        return _fail(name, f"{path}: cannot read ({exc.strerror})", fix)
    except ValueError:
        return _fail(name, f"{path}: not a PEM certificate", fix)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return _fail(name, f"{path}: not a CA certificate", fix)
    return _validity(name, str(path), cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def _validity(
    name: str, what: str, not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime
) -> CheckResult:
    renew = "ask the aggregator's admin for a new kit (`medfed provision`) before it expires"
    if now < not_before:
        return _fail(
            name,
            f"{what}: not valid until {not_before.isoformat()}",
            "check this machine's clock (NTP)",
        )
    if now > not_after:
        return _fail(name, f"{what}: expired on {not_after.date().isoformat()}", renew)
    left = not_after - now
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return _warn(
            name, f"{what}: expires in {left.days} days ({not_after.date().isoformat()})", renew
        )
    return _pass(name, f"{what}: valid until {not_after.date().isoformat()}")


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))[2:].rjust(4, "0")
