"""The ledger signing key: private from its first byte, refused when others can read it."""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.synchronize
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.errors import LedgerError
from medfed.privacy import key_id, load_or_create_signing_key, load_public_key, public_key_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_created_private_with_public_half(tmp_path: Path) -> None:
    path = tmp_path / "new" / "keys" / "ledger_ed25519.pem"
    previous = os.umask(0)  # even a permissive umask must not widen the key's mode
    try:
        key = load_or_create_signing_key(path)
    finally:
        os.umask(previous)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(tmp_path / "new") == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = public_key_path(path)
    assert pub == tmp_path / "new" / "keys" / "ledger_ed25519.pub"
    assert _mode(pub) == 0o644
    assert load_public_key(pub) == key.public_key()
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_key_is_loaded_again_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = load_or_create_signing_key(path)
    second = load_or_create_signing_key(path)
    assert key_id(first.public_key()) == key_id(second.public_key())


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == hashlib.sha256(raw).hexdigest()[:16]
    assert len(key_id(key)) == 16


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    load_or_create_signing_key(path)
    os.chmod(path, mode)
    with pytest.raises(LedgerError, match="accessible to group or others") as caught:
        load_or_create_signing_key(path)
    assert caught.value.hint == f"chmod 600 {path}"
    assert "PRIVATE" not in caught.value.one_line()


def test_public_key_of_another_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    load_or_create_signing_key(path)
    other = tmp_path / "other.pem"
    load_or_create_signing_key(other)
    public_key_path(path).write_bytes(public_key_path(other).read_bytes())
    with pytest.raises(LedgerError, match="does not belong to signing key"):
        load_or_create_signing_key(path)


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(LedgerError, match="not an unencrypted PEM private key"):
        load_or_create_signing_key(path)


def _create_and_report(
    path: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue[str]
) -> None:
    barrier.wait()
    results.put(key_id(load_or_create_signing_key(Path(path)).public_key()))


def test_concurrent_first_use_yields_one_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    path = tmp_path / "keys" / "k.pem"
    workers = 4
    barrier = context.Barrier(workers)
    results: multiprocessing.Queue[str] = context.Queue()
    processes = [
        context.Process(target=_create_and_report, args=(str(path), barrier, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    ids = [results.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert len(set(ids)) == 1
    assert ids[0] == key_id(load_or_create_signing_key(path).public_key())
    assert _mode(path) == 0o600
