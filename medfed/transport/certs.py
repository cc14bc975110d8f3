"""Keys and certificates for the federation: a private CA, the SuperLink's TLS certificate, and
the SuperNodes' OpenSSH identity keys.

Pure functions over ``cryptography`` objects: no file I/O here except reading certificates in
:func:`check_certificate`. Everything is EC P-384 because Flower's SuperNode authentication
requires P-384 node keys, and one curve for the whole workspace keeps audits simple.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.errors import ConfigError

CURVE_NAME = "secp384r1"
# Certificates are back-dated a little so that a site whose clock runs a few minutes behind
# the aggregator's does not reject a freshly provisioned certificate as "not yet valid".
_CLOCK_SKEW = dt.timedelta(minutes=5)
# Names every server certificate carries, so that a SuperLink and SuperNode on the same host
# (tests, demos, a proxy in front of the SuperLink) verify without extra configuration.
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertifiedKey:
    """A private key with its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode identity key pair, serialised the way Flower reads it."""

    private_openssh: bytes
    public_openssh: str

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint as ``ssh-keygen -lf node_key.pub`` prints it (``SHA256:...``).

        Sites and the aggregator compare it out of band before the key is registered.
        """
        blob = base64.b64decode(self.public_openssh.split()[1])
        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
        return "SHA256:" + digest.rstrip("=")


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-384 private key."""
    return ec.generate_private_key(ec.SECP384R1())


def parse_host(host: str) -> x509.GeneralName:
    """The subjectAltName entry for ``host``: an IP address if it parses as one, else a DNS name.

    Raises :class:`ConfigError` for anything that is neither (spaces, a URL, a port).
    """
    text = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigError(
            f"host {host!r} is neither an IP address nor a DNS name",
            hint="give the aggregator's address as sites will dial it, without scheme or port, "
            "e.g. --host fl.hospital.example or --host 10.0.0.5",
        )
    return x509.DNSName(name.lower())


def make_ca(*, now: dt.datetime, valid_days: int, common_name: str) -> CertifiedKey:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertifiedKey(key=key, cert=cert)


def make_server_cert(
    *, ca: CertifiedKey, host: str, now: dt.datetime, valid_days: int
) -> CertifiedKey:
    """A TLS server certificate for the SuperLink at ``host``, signed by ``ca``.

    The validity never extends past the CA's: a certificate outliving its issuer fails anyway.
    """
    key = new_key()
    primary = parse_host(host)
    names: list[x509.GeneralName] = [primary]
    for extra in _LOOPBACK_NAMES:
        entry = parse_host(extra)
        if entry not in names:
            names.append(entry)
    public = key.public_key()
    not_after = min(now + dt.timedelta(days=valid_days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(primary.value))]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA384())
    )
    return CertifiedKey(key=key, cert=cert)


def make_node_key() -> NodeKey:
    """A SuperNode identity key in OpenSSH format (``--auth-supernode-private-key``)."""
    key = new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode reads it unattended; file mode guards it
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return NodeKey(private_openssh=private, public_openssh=public.decode("ascii"))


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM: what ``flower-superlink --ssl-keyfile`` and ``ssl`` load."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """A certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def check_certificate(
    *, cert: Path, ca: Path, now: dt.datetime | None = None, server: bool = True
) -> list[str]:
    """Everything wrong with ``cert`` as a certificate issued by the CA in ``ca``.

    An empty list means the certificate was signed by that CA, both are valid at ``now``
    (default: the current time) and, with ``server``, it may be used as a TLS server
    certificate. Unreadable or non-PEM files raise :class:`ConfigError` instead: they are a
    setup mistake, not a certificate problem.
    """
    moment = now or dt.datetime.now(dt.UTC)
    leaf = _read_cert(cert)
    issuer = _read_cert(ca)
    problems: list[str] = []
    try:
        leaf.verify_directly_issued_by(issuer)
    except ValueError:
        problems.append(
            f"{cert}: issued by '{leaf.issuer.rfc4514_string()}', "
            f"not by the CA '{issuer.subject.rfc4514_string()}' in {ca}"
        )
    except (InvalidSignature, TypeError, UnsupportedAlgorithm):
        problems.append(f"{cert}: signature does not verify with the CA key in {ca}")
    problems += _validity_problems(leaf, cert, moment)
    problems += _validity_problems(issuer, ca, moment)
    if not _is_ca(issuer):
        problems.append(f"{ca}: not a CA certificate (basicConstraints CA is not set)")
    if server:
        problems += _server_usage_problems(leaf, cert)
    return problems


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _read_cert(path: Path) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read certificate ({exc.strerror})",
            hint="check the path; certificates are in the provisioned workspace",
        ) from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(
            f"{path}: not a PEM certificate", hint="copy the file again from the workspace"
        ) from None


def _validity_problems(cert: x509.Certificate, path: Path, now: dt.datetime) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [f"{path}: not valid until {cert.not_valid_before_utc.isoformat()} (check clock)"]
    if now > cert.not_valid_after_utc:
        return [f"{path}: expired on {cert.not_valid_after_utc.isoformat()}"]
    return []


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _server_usage_problems(cert: x509.Certificate, path: Path) -> list[str]:
    problems: list[str] = []
    if _is_ca(cert):
        problems.append(f"{path}: is a CA certificate, not a server certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            problems.append(f"{path}: keyUsage lacks digitalSignature (needed for TLS)")
    except x509.ExtensionNotFound:
        pass  # no keyUsage extension means no restriction (RFC 5280)
    try:
        purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in purposes:
            problems.append(f"{path}: extendedKeyUsage lacks serverAuth")
    except x509.ExtensionNotFound:
        problems.append(f"{path}: no extendedKeyUsage serverAuth")
    return problems
