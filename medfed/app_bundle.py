"""Flower app bundles (FABs): the medfed app's own, and the digests a site's allow-list holds.

Open-source Flower runs whatever app a run ships, so a site node checks each bundle against
an allow-list before any of its code is imported (:mod:`medfed.site.app_guard`). Two SHA-256
values name a bundle, and either may be listed:

* the *file hash*: SHA-256 of the ``.fab`` bytes, Flower's own ``fab_hash`` (the name
  ``flwr build`` gives the file). ``flwr run`` builds the bundle with fixed zip dates and sorted
  names, so the same app gives the same bytes on the same platform, but the bytes come out of
  zlib's deflate: a host whose zlib differs (zlib-ng on newer Fedora/RHEL, for one) compresses
  differently and gets another hash for the same app.
* the *content digest*: SHA-256 over every member's name and the SHA-256 of its uncompressed
  bytes, in name order. It depends only on what gets installed, so an aggregator and a site
  on different platforms agree on it. This is the default medfed allows.

Both are computed from the bytes that arrive, never taken from the sender.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfed.errors import AppBundleError, ConfigError, MedfedError

# Flower refuses to build bundles over 10 MB; what they unpack to is bounded here, so that a
# hostile bundle cannot exhaust memory while it is checked.
MAX_UNPACKED_BYTES: Final = 64 * 1024 * 1024
_CONTENT_DIGEST_TAG: Final = b"medfed-fab-content-v1\n"
_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True)
class FabInfo:
    """What a bundle is: its two digests, its members and the app its pyproject.toml names."""

    file_sha256: str
    content_digest: str
    members: dict[str, bytes]
    fab_id: str  # "publisher/name", as Flower's Run carries it
    version: str

    @property
    def digests(self) -> frozenset[str]:
        return frozenset({self.file_sha256, self.content_digest})


def medfed_app_directory() -> Path:
    """The Flower app every medfed run ships (no code: it points at the installed medfed)."""
    # medfed.transport's package data, found without importing that package
    path = Path(__file__).parent / "transport" / "flwr_app"
    if not (path / "pyproject.toml").is_file():
        raise ConfigError(f"{path}: the medfed Flower app is missing", hint="reinstall medfed")
    return path


def build_fab(app_dir: Path) -> bytes:
    """The bundle ``flwr run APP_DIR`` would send, built by Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    try:
        return build_fab_from_disk(Path(app_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{app_dir}: not a buildable Flower app ({exc})") from None


@functools.cache
def medfed_app() -> FabInfo:
    """The installed medfed's app, as an aggregator of this same version builds it."""
    return read_fab(build_fab(medfed_app_directory()))


def read_fab(data: bytes) -> FabInfo:
    """Unpack ``data`` in memory, within bounds, and describe it; nothing is written or run."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise AppBundleError("the app bundle is not a zip archive") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            # Two members of one name: which one gets installed is up to the unpacker.
            raise AppBundleError("the app bundle holds a file name twice")
        members: dict[str, bytes] = {}
        total = 0
        for info in infos:
            if info.is_dir():
                continue
            chunks = []
            with archive.open(info) as stream:
                while chunk := stream.read(_CHUNK):
                    total += len(chunk)
                    if total > MAX_UNPACKED_BYTES:
                        raise AppBundleError(
                            f"the app bundle unpacks to more than {MAX_UNPACKED_BYTES} bytes"
                        )
                    chunks.append(chunk)
            members[info.filename] = b"".join(chunks)
    fab_id, version = _app_identity(members)
    return FabInfo(
        file_sha256=hashlib.sha256(data).hexdigest(),
        content_digest=content_digest(members),
        members=members,
        fab_id=fab_id,
        version=version,
    )


def content_digest(members: dict[str, bytes]) -> str:
    """SHA-256 over the members' names and content hashes, in name order."""
    digest = hashlib.sha256(_CONTENT_DIGEST_TAG)
    for name in sorted(members):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(members[name]).hexdigest().encode("ascii") + b"\n")
    return digest.hexdigest()


def _app_identity(members: dict[str, bytes]) -> tuple[str, str]:
    try:
        config: dict[str, Any] = tomllib.loads(members["pyproject.toml"].decode("utf-8"))
        publisher = config["tool"]["flwr"]["app"]["publisher"]
        name, version = config["project"]["name"], config["project"]["version"]
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise AppBundleError("the app bundle has no readable pyproject.toml") from None
    if not all(isinstance(value, str) for value in (publisher, name, version)):
        raise AppBundleError("the app bundle's pyproject.toml names no app")
    return f"{publisher}/{name}", version


def describe_app(path: Path) -> FabInfo:
    """A ``.fab`` file's or an app directory's digests (for hospital IT's allow-list)."""
    path = Path(path)
    return read_fab(build_fab(path) if path.is_dir() else path.read_bytes())


def main(argv: list[str] | None = None) -> int:
    """``python -m medfed.app_bundle [APP_DIR_OR_FAB ...]``: print the digests."""
    import sys

    paths = (sys.argv[1:] if argv is None else argv) or [str(medfed_app_directory())]
    for item in paths:
        try:
            info = describe_app(Path(item))
        except (OSError, MedfedError) as exc:
            print(f"{item}: {exc}", file=sys.stderr)
            return 1
        print(f"{item}\n  app {info.fab_id} {info.version}")
        print(f"  content digest  {info.content_digest}\n  file sha256     {info.file_sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
