"""The ``flwr-clientapp`` a site node runs per message when its warm worker is on.

Flower's SuperExec starts ``flwr-clientapp`` once per message. Started cold, that process spends
seconds importing torch, MONAI and Opacus before the app guard looks at the message. This
client, run with ``python -I -S`` so that it imports only the standard library, hands its
command line, environment, working directory and its three standard streams (as file
descriptors) to the site's warm worker (:mod:`medfed.site.warm_worker`), waits for the forked
ClientApp to finish and exits with its status. The forked process runs the same app guard
(:func:`medfed.site.app_guard.main`) as the cold path, so every message's app bundle is checked
the same way.

When the worker cannot be reached, the client runs the cold guard in its place (``exec``) and
says so on stderr, which is the SuperNode's log: a missing worker costs speed, never a message.
If the worker is lost while it runs a message, that message fails, as a crashed ClientApp's
would; the ledger was written before anything left the site, so the round is declined or
replayed exactly as after any crash.

This file must stay importable without medfed installed on ``sys.path``: standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

SOCKET_ENV = "MEDFED_WARM_SOCKET"
#: A socket path too long for AF_UNIX lives in a private temporary directory of this prefix,
#: which the worker removes when it stops.
TEMP_DIR_PREFIX = "medfed-warm-"
# The cold path: Flower's flwr-clientapp behind medfed's app guard (medfed.site.app_guard).
GUARD_CODE = (
    "import sys; sys.argv[0] = sys.argv.pop(1); from medfed.site.app_guard import main; "
    "sys.exit(main())"
)
CONNECT_TIMEOUT_S = 5.0
_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!i")


def encode_request(*, argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    """A request as it travels: its length, then JSON."""
    body = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode("utf-8")
    return _LENGTH.pack(len(body)) + body


def read_status(sock: socket.socket) -> int | None:
    """The worker's answer: the ClientApp's exit status, or None if the worker went away."""
    data = b""
    while len(data) < _STATUS.size:
        chunk = sock.recv(_STATUS.size - len(data))
        if not chunk:
            return None
        data += chunk
    status: int = _STATUS.unpack(data)[0]
    return status


def send_status(sock: socket.socket, status: int) -> None:
    sock.sendall(_STATUS.pack(status))


def _cold(argv: list[str], why: str) -> None:
    print(
        f"medfed: the site's warm worker is not available ({why}); running this ClientApp cold",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, [sys.executable, "-P", "-c", GUARD_CODE, *argv])


def main(argv: list[str]) -> int:
    """``argv``: the ``flwr-clientapp`` script's path, then Flower's arguments."""
    path = os.environ.get(SOCKET_ENV, "")
    if not path:
        _cold(argv, f"{SOCKET_ENV} is not set")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(path)
        sock.settimeout(None)
        request = encode_request(argv=argv, env=dict(os.environ), cwd=os.getcwd())
        socket.send_fds(sock, [request], [0, 1, 2])
    except OSError as exc:
        sock.close()
        _cold(argv, f"{path}: {exc.strerror or exc}")
    status = read_status(sock)
    if status is None:
        print(
            "medfed: the site's warm worker stopped while it ran this ClientApp; the message "
            "is lost and the worker is restarted",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
