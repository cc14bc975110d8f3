"""Launch the real Flower deployment (flwr 1.41) from a provisioned workspace and site configs.

The aggregator side runs ``flower-superlink`` (one HTTPS port for the Fleet, Control and Runtime
APIs, TLS from the workspace, SuperNode authentication on, state in ``<workspace>/state``); the
admin registers every site's node key with ``flwr supernode register`` and submits runs with
``flwr run``; each site runs ``flower-supernode`` with its TLS root and node key, and hands its
``site.yaml`` to the ClientApp as the node config ``site-config``. All ``flwr`` commands run as
subprocesses with ``--format json`` against a named connection in ``$FLWR_HOME/config.toml``;
only the site's app guard (:func:`app_guard_env`) imports parts of Flower, to check them.
Processes are started and stopped by :mod:`medfed.transport.processes`; the `flwr` command line
is wrapped in :mod:`medfed.transport.flwr_cli`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from medfed.config.site import SiteConfig, TransportSection
from medfed.errors import ConfigError, TransportError
from medfed.site.warm_client import SOCKET_ENV as WARM_SOCKET_ENV
from medfed.site.warm_client import TEMP_DIR_PREFIX as WARM_TEMP_DIR_PREFIX
from medfed.storage import make_private_dirs
from medfed.transport.flwr_cli import (
    CONTROL_CHARS,
    DEFAULT_CONNECTION,
    flwr_error_text,
    run_flwr,
    write_connection,
)
from medfed.transport.processes import (
    ManagedProcess,
    check_port_free,
    free_port,
    launch,
    venv_bin_dir,
    wait_until_tls_ready,
)
from medfed.workspace import Workspace

# The node_config key under which a ClientApp finds the absolute path of its site's site.yaml.
NODE_CONFIG_SITE_KEY = "site-config"
# Under the site's workdir: the app guard that the SuperNode runs as `flwr-clientapp`.
GUARD_BIN_DIR = "bin"
# The SuperExec looks for a message to run every second by default; a message waits for half
# that on average. Flower reads this variable (0.01 s to 60 s) in flwr 1.41.
SUPEREXEC_ENV: Final = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
# An AF_UNIX socket path holds at most 107 bytes on Linux, 103 on macOS.
_MAX_SOCKET_PATH: Final = 100
# flwr's ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE, as `flwr supernode register` reports it.
log = logging.getLogger("medfed.transport.deploy")
_KEY_IN_USE = re.compile(r"\[code: 23\]|public key already in use", re.IGNORECASE)


@dataclass(frozen=True)
class SiteRegistration:
    """Outcome of registering one site's node key; ``node_id`` is None if it already was."""

    site_id: str
    node_id: int | None
    already_registered: bool


# --- SuperLink ---------------------------------------------------------------------------------


SuperLinkState = Literal["sqlite", "memory"]
# flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME, flower-superlink's own default (a test checks).
IN_MEMORY_DATABASE: Final = ":flwr-in-memory:"


def superlink_command(
    *, workspace: Workspace, bind_host: str | None = None, state: SuperLinkState = "sqlite"
) -> list[str]:
    """The ``flower-superlink`` command line for ``workspace``.

    ``state`` ``sqlite`` keeps node registrations and runs in ``<workspace>/state/superlink.db``
    across restarts. ``memory`` keeps them, and every message's payload, in the SuperLink's
    memory (``--database :flwr-in-memory:``): for a SuperLink that lives exactly as long as
    its federation (started, sites registered, one run, stopped). Flower 1.41 keeps its link
    state *and* its object store (every model sent either way) in that one SQLite file, with
    a fixed 5 s busy timeout (``flwr/supercore/constant.py`` ``SQLITE_PRAGMAS``, no flag or
    environment variable changes it); with twenty SuperNodes on a loaded host a write waits
    longer than that, the SuperLink answers HTTP 500 ("database is locked"), and a SuperNode
    retries only 502/503/504 (``flwr/supercore/retry/http_retry.py``), so its reply is lost.
    In memory there is no file lock to wait for.
    """
    manifest = workspace.manifest
    files = {
        "--ssl-ca-certfile": workspace.path(manifest.superlink.ca_cert),
        "--ssl-certfile": workspace.path(manifest.superlink.cert),
        "--ssl-keyfile": workspace.path(manifest.superlink.key),
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ConfigError(
            f"SuperLink TLS files missing: {', '.join(missing)}",
            hint="re-provision the workspace with `medfed provision`",
        )
    argv = ["flower-superlink"]
    for flag, path in files.items():
        argv += [flag, str(path)]
    argv += [
        "--enable-supernode-auth",
        "--database",
        IN_MEMORY_DATABASE if state == "memory" else str(workspace.layout.superlink_db),
        "--host",
        bind_host or manifest.host,
        "--port",
        str(manifest.port),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    return argv


def check_superlink_port(*, workspace: Workspace, bind_host: str | None = None) -> None:
    """:class:`TransportError` if the SuperLink's port is taken (another SuperLink?); callers
    check it before they prepare anything else, so that a busy port costs nothing."""
    host = bind_host or workspace.manifest.host
    check_port_free(host, workspace.manifest.port, what="the SuperLink")


def start_superlink(
    *,
    workspace: Workspace,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    flwr_home: Path | None = None,
    bind_host: str | None = None,
    ready_timeout_s: float = 60.0,
    state: SuperLinkState = "sqlite",
) -> ManagedProcess:
    """Start the SuperLink and return once it accepts TLS connections on its port.

    ``env`` reaches the ServerApp processes (SuperLink -> ``flower-superexec`` ->
    ``flwr-serverapp`` inherit it). ``flwr_home`` defaults to ``<workspace>/state/flwr-home``;
    ``bind_host`` to the manifest's host. With ``state`` ``sqlite`` (the default) node
    registrations and runs are kept in ``<workspace>/state/superlink.db`` across restarts;
    ``memory`` is for a SuperLink that lives only as long as one federation
    (:func:`superlink_command` says why).
    """
    state_dir = workspace.layout.state
    make_private_dirs(state_dir)
    host = bind_host or workspace.manifest.host
    port = workspace.manifest.port
    check_superlink_port(workspace=workspace, bind_host=bind_host)
    process = launch(
        name="superlink",
        argv=superlink_command(workspace=workspace, bind_host=bind_host, state=state),
        log_file=log_file,
        flwr_home=flwr_home or workspace.layout.flwr_home,
        env=env,
        cwd=state_dir,
    )
    try:
        wait_until_tls_ready(
            process=process,
            host=host,
            port=port,
            ca_file=workspace.path(workspace.manifest.ca.cert),
            timeout_s=ready_timeout_s,
        )
    except BaseException:
        process.stop(grace_s=5.0)
        raise
    return process


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as host and port; :class:`ConfigError` if it is neither."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        raise ConfigError(f"{address!r} is not host:port", hint="re-provision the workspace")
    return host, int(port)


def require_aggregator(*, workspace: Workspace, timeout_s: float = 3.0) -> None:
    """:class:`TransportError` unless something accepts connections at the workspace's
    aggregator address: a run submitted there would otherwise fail deep inside ``flwr``."""
    address = workspace.manifest.address
    host, port = split_address(address)
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((probe, port), timeout=timeout_s):
            return
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
    raise TransportError(
        f"no aggregator is running at {address} for the workspace {workspace.root} ({why})",
        hint=f"start it: medfed aggregator start --workspace {workspace.root}",
    )


# --- connection and registration (the `flwr` CLI) ----------------------------------------------


def register_sites(
    *,
    workspace: Workspace,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    address: str | None = None,
) -> list[SiteRegistration]:
    """Register every provisioned site's node key with the running SuperLink, named by site id.

    Writes the connection first (``address`` defaults to the manifest's). Idempotent: a key
    the SuperLink already knows (also across restarts, from its database) is reported with
    ``already_registered=True`` and no node id, since ``flwr`` does not return it then.
    """
    write_connection(
        flwr_home=flwr_home,
        address=address or workspace.manifest.address,
        root_certificates=workspace.path(workspace.manifest.ca.cert),
        name=connection,
    )
    results = []
    for entry in workspace.manifest.sites:
        key = workspace.path(entry.node_public_key_file)
        args = ["supernode", "register", str(key), connection, "--name", entry.site_id]
        reply = run_flwr(args, flwr_home=flwr_home, check=False)
        if reply.get("success"):
            node_id = int(reply["node-id"])
            results.append(SiteRegistration(entry.site_id, node_id, already_registered=False))
        elif _KEY_IN_USE.search(str(reply.get("error-message", ""))):
            results.append(SiteRegistration(entry.site_id, None, already_registered=True))
        else:
            raise TransportError(
                f"registering site {entry.site_id!r} failed: {flwr_error_text(reply)}",
                hint="is the SuperLink running and reachable with the workspace CA?",
            )
    return results


# --- SuperNode ---------------------------------------------------------------------------------


def node_config_arg(config_path: Path) -> str:
    """The ``--node-config`` value carrying ``site.yaml``'s absolute path.

    flwr 1.41 splits the value into ``key=value`` pairs (a value quoted with ' or " may hold
    spaces) and reads each as TOML; a TOML literal string ('...') takes the path as it is,
    backslashes included, but cannot hold a quote ' or a control character.
    """
    path = str(Path(config_path).absolute())
    if "'" in path or CONTROL_CHARS.search(path):
        raise ConfigError(
            f"{path}: a site config path with a quote (') or control character cannot be "
            "passed to Flower's --node-config",
            hint="move or rename the file (spaces are fine)",
        )
    return f"{NODE_CONFIG_SITE_KEY}='{path}'"


def site_transport(site: SiteConfig, *, config_path: Path) -> TransportSection:
    """The site's transport section; :class:`TransportError` for a config without one."""
    if site.transport is None:
        raise TransportError(
            f"{config_path}: no transport section; the node does not know its SuperLink",
            hint="copy the transport section from site.template.yaml in the site's kit",
        )
    return site.transport


def supernode_command(
    *,
    config_path: Path,
    site: SiteConfig,
    runtime_port: int,
    max_retries: int | None = None,
    max_wait_time_s: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for ``site`` (whose ``transport`` must be set)."""
    transport = site_transport(site, config_path=config_path)
    base = Path(config_path).absolute().parent
    root = _kit_file(base, transport.root_certificates, "transport.root_certificates")
    key = _kit_file(base, transport.node_private_key, "transport.node_private_key")
    argv = [
        "flower-supernode",
        "--superlink",
        transport.superlink_address,
        "--root-certificates",
        str(root),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config_arg(config_path),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time_s is not None:
        argv += ["--max-wait-time", str(max_wait_time_s)]
    return argv


def start_supernode(
    *,
    config_path: Path,
    site: SiteConfig,
    log_file: Path,
    clientappio_port: int | None = None,
    flwr_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    max_retries: int | None = None,
    max_wait_time_s: float | None = None,
) -> ManagedProcess:
    """Start this site's SuperNode; it connects out to the SuperLink and retries until then.

    The SuperNode's local runtime API (where each ``flwr-clientapp`` fetches its message)
    listens on 127.0.0.1:``clientappio_port``, a free port if not given, so several SuperNodes
    fit on one host. ``flwr_home`` (installed app bundles) defaults to
    ``<workdir>/flwr-home``; the SuperNode and its ClientApps run in the site's workdir with
    ``env`` added to their environment. ``max_retries``/``max_wait_time_s`` bound the
    reconnection attempts (unbounded by default, right for a service). The SuperNode runs
    each ClientApp through the site's app guard (:func:`app_guard_env`): only app bundles on
    the site's allow-list are installed and run.
    """
    port = clientappio_port or free_port()
    if clientappio_port is not None:
        check_port_free("127.0.0.1", port, what="the SuperNode's runtime API")
    argv = supernode_command(
        config_path=config_path,
        site=site,
        runtime_port=port,
        max_retries=max_retries,
        max_wait_time_s=max_wait_time_s,
    )
    workdir = site.paths.workdir
    if not workdir.is_absolute():
        workdir = Path(config_path).absolute().parent / workdir
    warm = site_transport(site, config_path=config_path).warm_worker
    if warm:
        from medfed.site.warm_worker import warm_available

        why = warm_available()
        if why is not None:
            log.warning(
                "site %s: no warm worker (%s); every ClientApp runs cold", site.site_id, why
            )
            warm = False
    guard_env = app_guard_env(site=site, bin_dir=workdir / GUARD_BIN_DIR, warm=warm)
    if warm:
        socket_path = Path(guard_env[WARM_SOCKET_ENV])
        argv = [
            *(sys.executable, "-P", "-m", "medfed.site.warm_worker", "supervise"),
            *("--socket", str(socket_path), "--", *argv),
        ]
    return launch(
        name=f"supernode[{site.site_id}]",
        argv=argv,
        log_file=log_file,
        flwr_home=flwr_home or workdir / "flwr-home",
        env={**(env or {}), **guard_env, **SUPEREXEC_ENV},
        cwd=workdir,
    )


def app_guard_env(*, site: SiteConfig, bin_dir: Path, warm: bool = False) -> dict[str, str]:
    """Install the app guard for a SuperNode; the environment that makes it run.

    Flower's SuperNode starts ``flwr-clientapp`` by name from its ``PATH``: the guard written
    to ``bin_dir`` comes first there, and gets the site's allow-list (``'medfed'`` resolved to
    the installed medfed app's digests) in ``MEDFED_ALLOWED_APPS``. Flower internals the guard
    depends on are checked here, so a node that could not check apps does not start. With
    ``warm``, the guard is reached through the warm worker's socket (``MEDFED_WARM_SOCKET``,
    in a private directory beside ``bin_dir``; :mod:`medfed.site.warm_worker`).
    """
    from medfed.app_bundle import medfed_app
    from medfed.config.site import MEDFED_APP
    from medfed.site.app_guard import (
        ALLOWED_APPS_ENV,
        SITE_ID_ENV,
        check_flower_internals,
        write_guard,
    )

    check_flower_internals()
    allowed: list[str] = []
    for entry in site.policy.app_allow_list:
        allowed += sorted(medfed_app().digests) if entry == MEDFED_APP else [entry]
    write_guard(bin_dir, warm=warm)
    path = os.pathsep.join([str(bin_dir), str(venv_bin_dir()), os.environ.get("PATH", os.defpath)])
    env = {
        "PATH": path,
        ALLOWED_APPS_ENV: ",".join(dict.fromkeys(allowed)),
        SITE_ID_ENV: site.site_id,
    }
    if warm:
        env[WARM_SOCKET_ENV] = str(warm_socket_path(bin_dir.parent))
    return env


def warm_socket_path(workdir: Path) -> Path:
    """The warm worker's socket, in a private directory under ``workdir`` when its path fits.

    Otherwise (AF_UNIX paths are short) in the temporary directory named after the workdir:
    the same one at every start, so a node killed outright leaves at most one behind, which its
    next start takes over. One that is not this user's private directory is never used.
    """
    path = Path(workdir) / "warm" / "worker.sock"
    if len(os.fsencode(path)) < _MAX_SOCKET_PATH:
        make_private_dirs(path.parent)
        return path
    digest = hashlib.sha256(os.fsencode(Path(workdir).absolute())).hexdigest()[:24]
    directory = Path(tempfile.gettempdir()) / f"{WARM_TEMP_DIR_PREFIX}{digest}"
    try:
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
    except FileExistsError:
        info = directory.lstat()
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.getuid()
            or stat.S_IMODE(info.st_mode) != 0o700
        ):
            # someone else's, or not private: a fresh one of random name instead
            directory = Path(tempfile.mkdtemp(prefix=WARM_TEMP_DIR_PREFIX))
    return directory / "worker.sock"


# --- helpers -----------------------------------------------------------------------------------


def _kit_file(base: Path, path: Path, key: str) -> Path:
    full = path if path.is_absolute() else base / path
    if not full.is_file():
        raise TransportError(
            f"{full}: file of {key} not found",
            hint="copy it from the site's kit made by `medfed provision`",
        )
    return full
