"""The site node's warm worker: ClientApps forked from a process that imported torch already.

A cold ClientApp process spends seconds importing torch, MONAI and Opacus for every message.
With the warm worker, ``medfed site start`` runs the SuperNode under a small supervisor
(:func:`supervise`) that also keeps a fork server (:func:`serve`) alive: the fork server imports
the site's stack once, listens on a Unix socket in a private directory, and for every message
forks a child that runs the app guard (:func:`medfed.site.app_guard.main`, Flower's own
``flwr-clientapp`` code with the bundle checks) with the command line, environment, working
directory and standard streams that :mod:`medfed.site.warm_client` hands over. The child loads
the site config, the manifest and the preprocessed-data cache from disk as a cold ClientApp
does, so a changed config, manifest or dataset is seen by the next message; only imported code
is shared.

Failure handling: a child that crashes costs its message, as a cold ClientApp's crash would
(the ledger was written before anything left the site). A fork server that exits is restarted
by the supervisor; while it is down, and for good after it crashed ``MAX_RESTARTS`` times in a
minute, messages run cold (:mod:`medfed.site.warm_client` falls back on its own). Only the
owner of the socket's directory can connect, and the peer's uid is checked as well.

Run as ``python -m medfed.site.warm_worker supervise --socket S -- flower-supernode ...`` and
``python -m medfed.site.warm_worker serve --socket S``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from medfed.site.warm_client import TEMP_DIR_PREFIX, send_status

log = logging.getLogger("medfed.site.warm_worker")

MAX_RESTARTS: Final = 3
_RESTART_WINDOW_S: Final = 60.0
_TICK_S: Final = 0.1
_MAX_REQUEST: Final = 1 << 22
# What a ClientApp imports; Flower's runtime last, as the guard checks its names.
_PRELOAD: Final = (
    "torch",
    "monai",
    "opacus",
    "medfed.site.clientapp",
    "medfed.site.federated",
    "medfed.site.trainer",
    "medfed.site.app_guard",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def warm_available() -> str | None:
    """Why this platform cannot run the warm worker, or None when it can."""
    if not hasattr(os, "fork") or not hasattr(socket, "AF_UNIX"):
        return "this platform cannot fork or has no Unix sockets"
    if not hasattr(socket, "send_fds") or not hasattr(socket, "SO_PEERCRED"):
        return "this platform cannot pass file descriptors or check a socket's peer"
    return None


# --- the fork server ---------------------------------------------------------------------------


def serve(socket_path: Path) -> int:
    """Listen on ``socket_path`` (its directory must be private) and fork a ClientApp per request.

    Runs until SIGTERM; children still running then get SIGTERM too.
    """
    from medfed.logs import configure_from_env

    configure_from_env()
    listener = _listen(socket_path)
    started = time.monotonic()
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    log.info("warm worker ready in %.1f s at %s", time.monotonic() - started, socket_path)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    try:
        while not stopping:
            for key, _ in selector.select(timeout=_TICK_S):
                if key.fileobj is listener:
                    pid, conn = _accept(listener, selector, (listener, *by_conn))
                    if pid is not None and conn is not None:
                        children[pid], by_conn[conn] = conn, pid
                else:
                    # A client sends nothing after its request: readable means it is gone
                    # (Flower or a service stop ended it), so its ClientApp is asked to stop
                    # the way a cold one would have been: SIGTERM, which ends a round with its
                    # steps committed to the ledger.
                    gone = key.fileobj
                    assert isinstance(gone, socket.socket)
                    pid = by_conn.pop(gone)
                    children.pop(pid, None)
                    selector.unregister(gone)
                    gone.close()
                    _kill(pid, signal.SIGTERM)
            _reap(children, by_conn, selector)
    finally:
        for pid in children:
            _kill(pid, signal.SIGTERM)
        listener.close()
        socket_path.unlink(missing_ok=True)
    return 0


def _remove_temp_dir(directory: Path) -> None:
    """Remove the socket's directory if it is the temporary one made for a long path."""
    if directory.name.startswith(TEMP_DIR_PREFIX) and directory.parent == Path(
        tempfile.gettempdir()
    ):
        with contextlib.suppress(OSError):  # not empty, or already gone
            directory.rmdir()


def _listen(path: Path) -> socket.socket:
    directory = path.parent
    if directory.stat().st_mode & 0o077 or directory.stat().st_uid != os.getuid():
        raise SystemExit(f"{directory} must be a directory of this user with mode 0700")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def _accept(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    open_sockets: tuple[socket.socket, ...],
) -> tuple[int | None, socket.socket | None]:
    conn, _ = listener.accept()
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise OSError(f"a process of uid {uid} connected")
        conn.settimeout(10.0)
        request, fds = _read_request(conn)
    except (OSError, ValueError) as exc:
        log.warning("warm worker: refused a request: %s", exc)
        conn.close()
        return None, None
    pid = os.fork()
    if pid == 0:  # the ClientApp
        for sock in (*open_sockets, conn):
            sock.close()
        os._exit(_child(request, fds))
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    selector.register(conn, selectors.EVENT_READ)
    return pid, conn


def _read_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    import json

    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request must pass stdin, stdout and stderr")
    if len(data) < 4:
        raise ValueError("a request too short")
    length = struct.unpack("!I", data[:4])[0]
    if length > _MAX_REQUEST:
        raise ValueError(f"a request of {length} bytes")
    body = data[4:]
    while len(body) < length:
        chunk = conn.recv(min(65536, length - len(body)))
        if not chunk:
            raise ValueError("a request cut short")
        body += chunk
    request = json.loads(body)
    if not isinstance(request, dict) or set(request) != {"argv", "env", "cwd"}:
        raise ValueError("a request without argv, env and cwd")
    return request, list(fds)


def _child(request: dict[str, object], fds: list[int]) -> int:
    """In the forked process: become the ClientApp the client would have been."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    assert isinstance(argv, list) and isinstance(env, dict) and isinstance(cwd, str)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(cwd)
    sys.argv = [str(arg) for arg in argv]
    _reseed()
    from medfed.site.app_guard import main

    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the cold ClientApp would have died of it too, with a traceback
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reseed() -> None:
    """Forked children would share the server's generator states: give each its own."""
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.seed()


def _reap(
    children: dict[int, socket.socket],
    by_conn: dict[socket.socket, int],
    selector: selectors.BaseSelector,
) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        by_conn.pop(conn, None)
        selector.unregister(conn)
        with contextlib.suppress(OSError):  # the client may be gone already
            send_status(conn, os.waitstatus_to_exitcode(status) % 256)
        conn.close()


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


# --- the supervisor ----------------------------------------------------------------------------


def supervise(*, socket_path: Path, node_argv: list[str]) -> int:
    """Run the SuperNode and keep the fork server alive; the SuperNode's exit code."""
    from medfed.logs import configure_from_env

    configure_from_env()
    node = subprocess.Popen(node_argv)
    server: subprocess.Popen[bytes] | None = _start_server(socket_path)
    crashes: collections.deque[float] = collections.deque()
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in (node, server):
            if process is not None and process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while (code := node.poll()) is None:
            if server is not None and server.poll() is not None and not stopping:
                server = _restart(server, crashes, socket_path)
            time.sleep(_TICK_S)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        socket_path.unlink(missing_ok=True)
        _remove_temp_dir(socket_path.parent)
    return code


def _start_server(socket_path: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-P", "-m", "medfed.site.warm_worker", "serve"]
    return subprocess.Popen([*argv, "--socket", str(socket_path)])


def _restart(
    server: subprocess.Popen[bytes], crashes: collections.deque[float], socket_path: Path
) -> subprocess.Popen[bytes] | None:
    now = time.monotonic()
    crashes.append(now)
    while crashes and crashes[0] < now - _RESTART_WINDOW_S:
        crashes.popleft()
    if len(crashes) > MAX_RESTARTS:
        log.error(
            "the warm worker exited %d times within %.0f s (last code %s): every ClientApp of "
            "this node runs cold from now on",
            len(crashes),
            _RESTART_WINDOW_S,
            server.returncode,
        )
        return None
    log.warning(
        "the warm worker exited with code %s; restarting it (messages meanwhile run cold)",
        server.returncode,
    )
    return _start_server(socket_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medfed.site.warm_worker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("--socket", type=Path, required=True)
    supervise_cmd = commands.add_parser("supervise")
    supervise_cmd.add_argument("--socket", type=Path, required=True)
    supervise_cmd.add_argument("node_argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.socket)
    node_argv = args.node_argv[1:] if args.node_argv[:1] == ["--"] else args.node_argv
    return supervise(socket_path=args.socket, node_argv=node_argv)


if __name__ == "__main__":
    sys.exit(main())
