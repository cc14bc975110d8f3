"""The site node's ``flwr-clientapp``: run only allowed Flower app bundles.

Open-source Flower installs and runs whatever app bundle (FAB) a run ships. A SuperNode starts
one ``flwr-clientapp`` per message, found by name on its ``PATH``; ``medfed site start`` puts a
directory holding this guard under that name first on the SuperNode's ``PATH``
(:func:`write_guard`). The guard runs Flower's own ``flwr-clientapp`` code in its process with
two names of ``flwr.supernode.runtime.run_clientapp`` (flwr 1.41) wrapped:

* ``pull_task_input`` returns the message, context, run and bundle the SuperNode hands over;
  the wrapper keeps the run and the bundle's declared hash.
* ``install_from_fab`` gets the bundle's bytes before anything of the app is unpacked or
  imported; the wrapper checks them against the allow-list in ``MEDFED_ALLOWED_APPS``
  (:func:`check_bundle`), and after Flower installed them, that the installed directory holds
  exactly the bundle's files.

A refused bundle raises :class:`~medfed.errors.AppRefusedError` inside Flower's
``run_clientapp``, which replies to the message with ``Error(code=2, reason="<class
'...AppRefusedError'>:<'error[app-refused]: ...'>")`` (Flower's "ClientApp raised an
exception") and exits non-zero: the aggregator's ServerApp gets that error reply for its
message, and medfed's aggregator reads it as a decline with code ``app-refused``. No code of
the refused app is ever imported.

The wrapped names are Flower internals; :func:`check_flower_internals` verifies at node start
and in every guard that they exist and that ``run_clientapp`` looks them up at call time. If
Flower changed, the node does not start (and a guard that still finds a change runs nothing):
failing closed, not falling back to the unchecked command.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from medfed.app_bundle import FabInfo, read_fab
from medfed.errors import AppBundleError, AppRefusedError, TransportError

ALLOWED_APPS_ENV: Final = "MEDFED_ALLOWED_APPS"
SITE_ID_ENV: Final = "MEDFED_SITE_ID"
GUARD_NAME: Final = "flwr-clientapp"
_RUNTIME_MODULE: Final = "flwr.supernode.runtime.run_clientapp"
_WRAPPED: Final = ("pull_task_input", "install_from_fab")
# Installing app dependencies would run the bundle's build code before any check of ours.
_DEPENDENCY_FLAG: Final = "--allow-runtime-dependency-installation"

log = logging.getLogger("medfed.site.app_guard")


def check_flower_internals() -> ModuleType:
    """Flower's ClientApp runtime module, once the names the guard wraps are where expected."""
    import importlib

    try:
        module = importlib.import_module(_RUNTIME_MODULE)
        entry = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    except ImportError as exc:
        raise _moved(f"{_RUNTIME_MODULE} cannot be imported ({exc})") from None
    run = getattr(module, "run_clientapp", None)
    if not callable(getattr(entry, "flwr_clientapp", None)) or not callable(run):
        raise _moved("flwr_clientapp or run_clientapp is missing")
    for name in _WRAPPED:
        if not callable(getattr(module, name, None)):
            raise _moved(f"{_RUNTIME_MODULE}.{name} is missing")
        # Wrapping a module attribute only works if run_clientapp reads it as a global.
        if name not in run.__code__.co_names:
            raise _moved(f"run_clientapp no longer calls {name}")
    return module


def _moved(what: str) -> TransportError:
    import flwr

    return TransportError(
        f"the installed Flower ({getattr(flwr, '__version__', '?')}) is not the one medfed's app "
        f"guard was written for: {what}",
        hint="install the Flower version medfed pins (pip install 'medfed[site]'); the node "
        "refuses to run apps it cannot check",
    )


def allowed_from_env(environ: dict[str, str] | None = None) -> frozenset[str]:
    """The allow-list ``medfed site start`` passed down (empty: nothing is allowed)."""
    value = (os.environ if environ is None else environ).get(ALLOWED_APPS_ENV, "")
    return frozenset(item.strip().lower() for item in value.split(",") if item.strip())


def check_bundle(
    content: bytes,
    *,
    allowed: Iterable[str],
    declared_hash: str | None = None,
    fab_id: str | None = None,
    fab_version: str | None = None,
) -> FabInfo:
    """The bundle, if this site runs it; :class:`AppRefusedError` naming why not otherwise.

    ``declared_hash``, ``fab_id`` and ``fab_version`` are what the run claims (Flower loads
    the app from a directory named after them): they must be this bundle's.
    """
    allowed = frozenset(allowed)
    try:
        info = read_fab(content)
    except AppBundleError as exc:
        raise AppRefusedError(f"{exc.message}; refused") from None
    if not info.digests & allowed:
        raise AppRefusedError(
            f"app {info.fab_id} {info.version} (content digest {info.content_digest}, file "
            f"sha256 {info.file_sha256}) is not on this site's allow-list",
            hint="the site runs only the medfed app of its installed version; list other "
            "apps in policy.allowed_app_hashes",
        )
    if declared_hash is not None and declared_hash != info.file_sha256:
        raise AppRefusedError(
            f"the run declares app bundle hash {declared_hash[:16]}... but the bundle's bytes "
            f"hash to {info.file_sha256[:16]}..."
        )
    if (fab_id, fab_version) != (None, None) and (fab_id, fab_version) != (
        info.fab_id,
        info.version,
    ):
        raise AppRefusedError(
            f"the run names app {fab_id} {fab_version} but ships {info.fab_id} {info.version}"
        )
    return info


def check_installed(directory: Path, info: FabInfo) -> None:
    """The installed app directory holds exactly the bundle's files (``.info`` aside).

    Flower skips installing when a directory of the same name (publisher, name, version and
    8 hex digits of the hash) exists, so a directory left by another bundle would be run.
    """
    expected = {
        name: hashlib.sha256(data).hexdigest()
        for name, data in info.members.items()
        if not name.startswith(".info/")
    }
    found: dict[str, str] = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if path.is_dir() or "__pycache__" in relative.parts:
            continue
        found[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(
            name for name in found if found[name] != expected[name]
        )
        raise AppRefusedError(
            f"the installed app in {directory} differs from the allowed bundle ({differ[:3]})",
            hint=f"remove {directory}; the node installs the allowed bundle again",
        )


class _Guard:
    """The two wrappers, sharing what the SuperNode said about the run."""

    def __init__(self, module: ModuleType, allowed: frozenset[str], site_id: str) -> None:
        self._pull: Callable[..., Any] = module.pull_task_input
        self._install: Callable[..., Any] = module.install_from_fab
        self._allowed = allowed
        self._site_id = site_id
        self._run: Any = None
        self._fab: Any = None

    def pull_task_input(self, *args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = self._pull(*args, **kwargs)
        self._run, self._fab = run, fab
        return message, context, run, fab

    def install_from_fab(self, fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if not isinstance(fab_file, bytes) or self._run is None or self._fab is None:
                raise AppRefusedError("the app bundle did not come the way the guard expects")
            info = check_bundle(
                fab_file,
                allowed=self._allowed,
                declared_hash=self._fab.hash_str,
                fab_id=self._run.fab_id,
                fab_version=self._run.fab_version,
            )
            installed = self._install(fab_file, *args, **kwargs)
            check_installed(Path(installed), info)
        except AppRefusedError as exc:
            log.error(
                "refused the app bundle of Flower run %s: %s",
                getattr(self._run, "run_id", "?"),
                exc.message,
                extra={"site_id": self._site_id},
            )
            raise
        log.info(
            "app %s %s allowed (content digest %s)",
            info.fab_id,
            info.version,
            info.content_digest,
            extra={"site_id": self._site_id},
        )
        return installed


def main() -> int:
    """Entry point of the guard script: Flower's ``flwr-clientapp``, checked."""
    from medfed.logs import configure_from_env

    site_id = os.environ.get(SITE_ID_ENV) or "?"
    try:
        module = check_flower_internals()
    except TransportError as exc:
        problem: TransportError | None = exc
    else:
        problem = None
    # After Flower's import, which gives its logger a handler of its own that this replaces.
    configure_from_env()
    if problem is not None:
        # Without the wrapped names no bundle can be checked: run nothing.
        log.error("%s", problem.one_line(), extra={"site_id": site_id})
        return 1
    guard = _Guard(module, allowed_from_env(), site_id)
    module.pull_task_input = guard.pull_task_input  # type: ignore[attr-defined]
    module.install_from_fab = guard.install_from_fab  # type: ignore[attr-defined]
    if _DEPENDENCY_FLAG in sys.argv:
        log.warning("ignoring %s: app dependencies are not installed", _DEPENDENCY_FLAG)
        sys.argv = [arg for arg in sys.argv if arg != _DEPENDENCY_FLAG]
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()  # ends with Flower's own exit code (SystemExit)
    return 0


def guard_script(python: str, *, warm: bool = False) -> str:
    """The text of the ``flwr-clientapp`` script that runs the guard with ``python``.

    A shell script, so that an interpreter path with spaces works; ``-P`` keeps the working
    directory off ``sys.path``, and the script's own path stays ``argv[0]`` as Flower expects.
    With ``warm``, the script runs :mod:`medfed.site.warm_client` (standard library only, so
    it starts in tens of milliseconds), which hands the message to the warm worker or falls
    back to this same guard.
    """
    from medfed.site import warm_client

    if warm:
        command = f"{shlex.quote(python)} -I -S {shlex.quote(warm_client.__file__)}"
    else:
        command = f"{shlex.quote(python)} -P -c {shlex.quote(warm_client.GUARD_CODE)}"
    return (
        "#!/bin/sh\n"
        "# medfed's app guard: Flower's flwr-clientapp, run only for allowed app bundles.\n"
        "# Written by `medfed site start` at every start; edits are overwritten.\n"
        f'exec {command} "$0" "$@"\n'
    )


def write_guard(bin_dir: Path, *, python: str | None = None, warm: bool = False) -> Path:
    """Write the guard as ``bin_dir/flwr-clientapp`` (atomically, mode 0700); its path."""
    from medfed.storage import make_private_dirs, replace_file

    make_private_dirs(Path(bin_dir))
    path = Path(bin_dir) / GUARD_NAME
    script = guard_script(python or sys.executable, warm=warm)
    replace_file(path, script.encode("utf-8"), mode=0o700)
    return path
