"""The site's Ed25519 ledger-signing key: created once, kept private, identified by a short id.

Key material is never logged or put into error messages; only paths and key ids are.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.errors import LedgerError
from medfed.storage import fsync_dir, make_private_dirs, replace_file, write_all

_RESTORE_HINT = "restore the key from the site's backup; a new key cannot sign the existing ledger"


def public_key_path(key_path: Path) -> Path:
    """Where the public half of ``key_path`` is kept: same name, suffix ``.pub``."""
    return Path(key_path).with_suffix(".pub")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the site's signing key, creating it (and its ``.pub``) on first use.

    A new key is written as unencrypted PKCS8 PEM with mode 0600 from the moment the file
    exists; missing parent directories are created 0700. An existing key file that group or
    others can read or write is refused.
    """
    path = Path(path)
    if not path.exists():
        _create_key_file(path)
    key = _load_private_key(path)
    _ensure_public_file(path, key.public_key())
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key from PEM (as written next to the signing key)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(
            f"{path}: cannot read public key ({exc.strerror})",
            hint="copy the site's .pub file from the site's key directory",
        ) from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise LedgerError(
            f"{path}: not a PEM public key", hint="copy the site's .pub file again"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path}: not an Ed25519 public key", hint="use the site's ledger key")
    return key


def _create_key_file(path: Path) -> None:
    make_private_dirs(path.parent)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Write a private temporary file in full, then hard-link it into place: the key never
    # exists half-written under its name, and of two processes creating it at once exactly
    # one wins while the other loads the winner's key.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    fsync_dir(path.parent)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read signing key ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LedgerError(
            f"{path}: signing key is accessible to group or others (mode {stat.S_IMODE(mode):04o})",
            hint=f"chmod 600 {path}",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read signing key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise LedgerError(
            f"{path}: not an unencrypted PEM private key", hint=_RESTORE_HINT
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key", hint=_RESTORE_HINT)
    return key


def _ensure_public_file(key_path: Path, public_key: Ed25519PublicKey) -> None:
    pub_path = public_key_path(key_path)
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub_path.exists():
        if load_public_key(pub_path) != public_key:
            raise LedgerError(
                f"{pub_path}: public key does not belong to signing key {key_path}",
                hint=f"delete {pub_path} to have it written again from the signing key",
            )
        return
    replace_file(pub_path, pem, mode=0o644)
