"""Durable file operations: locking, appending one line, replacing a file whole, private dirs.

Every write is fsynced (and the directory too when a name changes), so that what a process
reports after a crash is what is on disk. The ledgers, run stores, tracking outbox, keys and
node status all write through here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfed.errors import StorageError


def lock_path(path: Path) -> Path:
    """The lock file that serialises writers of ``path``: ``<path>.lock``."""
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``path``'s lock file (exclusive to write, shared to read).

    A reader that may not create the lock file (a read-only copy) reads without it.
    """
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise StorageError(
                f"{lock_path(path)}: cannot create the lock file",
                hint="run as the user that owns the work directory",
            ) from None
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_bytes(path: Path) -> bytes:
    """A file's bytes, or empty bytes when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StorageError(f"{path}: cannot read ({exc.strerror})") from None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file does not exist."""
    data = read_bytes(path)
    if not data and not path.exists():
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise StorageError(f"{path}: not a valid JSON object", hint="restore it from backup")
    return obj


def append_line(path: Path, line: bytes) -> None:
    """Append ``line`` and a newline in one ``write`` on an O_APPEND descriptor, then fsync."""
    if b"\n" in line:
        raise StorageError(f"{path}: a line to append holds a newline")
    created = not path.exists()
    record = line + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"{path}: cannot open for appending ({exc.strerror})") from None
    try:
        written = os.write(fd, record)
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(
            f"{path}: append failed ({exc.strerror}); the last line may be incomplete",
            hint="free disk space, then restore the file from backup",
        ) from None
    finally:
        os.close(fd)
    if written != len(record):
        raise StorageError(
            f"{path}: only {written} of {len(record)} bytes were appended",
            hint="free disk space, then restore the file from backup",
        )
    if created:
        fsync_dir(path.parent)


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically give ``path`` the content ``data`` (temporary file, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte: ``os.write`` may write fewer than asked (a full disk, a signal)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, "no space left to write", str(fd))
        view = view[written:]


def fsync_dir(directory: Path) -> None:
    """Make a new or renamed directory entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700.

    Only directories created here get 0700; an existing parent keeps the mode its owner chose.
    """
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
