"""The aggregator: TCP reachability, the TLS handshake and whether the node key is registered.

Whether the node key is registered is asked of the SuperLink the way a SuperNode asks it,
without changing anything there: flwr 1.41's Fleet API ``ActivateNode`` looks the signed public
key up first and only then validates the heartbeat interval, so a request with an interval out
of bounds is answered "invalid heartbeat interval" (2003) for a registered key and "activation
failed" (2004) for an unknown one, before any node state changes. The request is signed like
the SuperNode's (``NodeAuthHttpInterceptor``: public key, timestamp, ECDSA signature of the
timestamp), so a clock too far off shows up here too. This leans on Flower internals, which is
why flwr is pinned and a version mismatch is a FAIL.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

from medfed.site.preflight.credentials import CERT_WARN_DAYS
from medfed.site.preflight.result import CheckResult, _fail, _pass, _warn

DEFAULT_TIMEOUT_S = 5.0
# flwr's ApiErrorCode values the registration probe tells apart (flwr.supercore.error).
_FLWR_INVALID_HEARTBEAT = 2003
_FLWR_ACTIVATION_FAILED = 2004
# Outside flwr's [10, 1800] s bounds: the SuperLink refuses it after the key lookup.
_PROBE_HEARTBEAT_S = 0.0

UNREACHABLE_FIX = (
    "is the aggregator running? check transport.superlink_address, DNS and the firewall "
    "(outgoing TCP to that port)"
)
UNREGISTERED_FIX = (
    "send node_key.pub (and its fingerprint, `ssh-keygen -lf node_key.pub`) to the "
    "aggregator's admin to register: `flwr supernode register node_key.pub ...`"
)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout_s: float) -> CheckResult:
    """A TCP connection to the SuperLink's port."""
    name = "aggregator reachable"
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return _fail(name, f"cannot connect to {address} ({reason})", UNREACHABLE_FIX)
    return _pass(name, f"TCP connection to {address}")


def check_tls(address: str, *, ca: Path, timeout_s: float, now: dt.datetime) -> CheckResult:
    """A TLS handshake with the SuperLink, its certificate verified with the site's CA."""
    name = "TLS"
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        return _fail(name, f"{ca}: cannot be loaded as a CA ({exc})", "copy ca.crt from the kit")
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            peer = tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        return _fail(name, _verify_problem(exc, address, ca), _verify_fix(exc))
    except (ssl.SSLError, OSError) as exc:
        return _fail(
            name,
            f"TLS handshake with {address} failed ({exc})",
            "is it the SuperLink's port, started with TLS (--ssl-certfile)?",
        )
    verified = f"{address}: certificate verified with {ca}"
    expiry = (peer or {}).get("notAfter")
    if not isinstance(expiry, str):
        return _pass(name, verified)
    not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(expiry), tz=dt.UTC)
    left = not_after - now
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return _warn(
            name,
            f"{verified}; it expires in {max(left.days, 0)} days ({not_after.date()})",
            "ask the aggregator's admin to renew the SuperLink certificate",
        )
    return _pass(name, f"{verified}, valid until {not_after.date()}")


def _verify_problem(exc: ssl.SSLCertVerificationError, address: str, ca: Path) -> str:
    reason = exc.verify_message or exc.reason or str(exc)
    if exc.verify_code in (2, 20, 21):  # unable to get (local) issuer certificate
        return f"{address}: its certificate is not signed by the CA in {ca} ({reason})"
    if exc.verify_code == 62:
        return f"{address}: its certificate does not name this host ({reason})"
    return f"{address}: certificate rejected ({reason})"


def _verify_fix(exc: ssl.SSLCertVerificationError) -> str:
    if exc.verify_code == 62:
        return "dial the aggregator by the name it was provisioned for (medfed provision --host)"
    if exc.verify_code in (9, 10):
        return "check this machine's clock; ask the aggregator's admin to renew the certificate"
    return (
        "use ca.crt from this federation's kit, and check that nothing in between (a proxy) "
        "presents its own certificate"
    )


def check_registration(
    address: str, *, ca: Path, private_key: Path, timeout_s: float
) -> CheckResult:
    """Whether the SuperLink knows this node's public key (see the module docstring)."""
    name = "node registered"
    try:
        import httpx
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.fleet_pb2 import ActivateNodeRequest
        from flwr.supercore.error import FlowerError
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    except ImportError as exc:
        return _warn(
            name,
            f"not checked: Flower's Fleet client is not importable ({exc})",
            "install the pinned flwr: pip install 'medfed[site]'",
        )
    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return _warn(name, f"not checked: node key unreadable ({exc})", "see the node key check")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return _warn(name, "not checked: the node key is not an EC key", "see the node key check")
    public = key.public_key()
    request = ActivateNodeRequest(
        public_key=public_key_to_bytes(public), heartbeat_interval=_PROBE_HEARTBEAT_S
    )
    client = FleetHttpClient(
        f"https://{address}",
        interceptors=[NodeAuthHttpInterceptor(key, public)],
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=timeout_s,
    )
    try:
        with client:
            client.ActivateNode(request)
    except httpx.HTTPStatusError as exc:
        error = FlowerError.from_json(exc.response.text)
        code = exc.response.status_code
        if error is not None and error.code == _FLWR_INVALID_HEARTBEAT:
            return _pass(name, f"the SuperLink at {address} knows this node's key")
        if error is not None and error.code == _FLWR_ACTIVATION_FAILED:
            return _fail(
                name,
                f"the SuperLink at {address} does not know this node's key",
                UNREGISTERED_FIX,
            )
        if code == 401:
            return _fail(
                name,
                f"the SuperLink at {address} refused the node's signed request (HTTP 401)",
                "sync this machine's clock (NTP): signatures are valid for seconds only",
            )
        found = f"Flower error {error.code}: {error.message}" if error else f"HTTP {code}"
        return _warn(
            name,
            f"unexpected answer from {address} ({found})",
            "is it a flwr 1.41 SuperLink (or a proxy passing /v1/fleet/*)?",
        )
    except httpx.HTTPError as exc:
        return _warn(
            name,
            f"not checked: {type(exc).__name__} talking to {address}",
            "see the reachability and TLS checks",
        )
    return _warn(
        name,
        f"the SuperLink at {address} accepted a probe it should refuse: cannot tell",
        "check that the aggregator runs the pinned flwr version",
    )
