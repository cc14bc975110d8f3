"""What a site's SuperNode log says about its connection to the aggregator, in medfed's words.

Flower's SuperNode reports a refused node key, a server certificate it cannot verify and an
aggregator it cannot reach only in its own log (a refusal ends it with exit code 1, an
unreachable aggregator is retried for ever). `medfed site start` reads the log as the node
runs: a refusal becomes one :class:`TransportError` naming the cause and its fix, an
unreachable aggregator one warning line (and a line when the node connects after all).

The markers are flwr 1.41's log lines (flwr is pinned); a log without a known marker is
reported with its last lines, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medfed.config.site import TransportSection
from medfed.errors import TransportError
from medfed.site.preflight.network import UNREACHABLE_FIX, UNREGISTERED_FIX, check_reachable
from medfed.site.preflight.result import CheckResult

# flwr.supercore.error.ApiErrorCode.ACTIVATION_FAILED, as the SuperNode prints it
_NOT_REGISTERED = "[code: 2004]"
_CERT_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed: ([^(\n]+)")
_CONNECTED = "SuperNode ID:"
_RETRYING = "Connection attempt failed"
_PROBE_TIMEOUT_S = 3.0
_KEPT_CHARS = 64_000

Say = Callable[[str], None]
Probe = Callable[[str], CheckResult]


def _probe(address: str) -> CheckResult:
    return check_reachable(address, timeout_s=_PROBE_TIMEOUT_S)


@dataclass
class NodeWatch:
    """Reads the node's log from where it stood at start; says what changed, once each."""

    transport: TransportSection
    log_file: Path
    say: Say
    probe: Probe = _probe
    _offset: int = field(default=0, init=False)
    _text: str = field(default="", init=False)
    _connected: bool = field(default=False, init=False)
    _warned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        try:
            self._offset = self.log_file.stat().st_size
        except OSError:
            self._offset = 0

    def tick(self) -> None:
        """Read what the node logged since the last tick and report a change of connection."""
        new = self._read_new()
        if not new:
            return
        last_connect = new.rfind(_CONNECTED)
        last_retry = new.rfind(_RETRYING)
        if last_connect > last_retry:
            if self._warned or not self._connected:
                self.say(f"connected to the aggregator at {self.transport.superlink_address}")
            self._connected, self._warned = True, False
        elif last_retry >= 0 and not self._warned:
            self._connected = False
            self._warn_unreachable()

    def exit_error(self, code: int | None) -> TransportError:
        """Why the node exited, from what it logged since this start."""
        self._read_new()
        address = self.transport.superlink_address
        if _NOT_REGISTERED in self._text:
            return TransportError(
                f"the aggregator at {address} refused this node: its key "
                f"{self.transport.node_public_key} is not registered there",
                hint=UNREGISTERED_FIX,
            )
        failed = _CERT_FAILED.search(self._text)
        if failed is not None:
            reason = failed.group(1).strip()
            return TransportError(
                f"the aggregator's certificate at {address} is not signed by the CA in "
                f"{self.transport.root_certificates} ({reason})",
                hint="set transport.root_certificates to ca.crt of this federation's kit; "
                "`medfed site check --config SITE.yaml` shows the TLS check in detail",
            )
        if _RETRYING in self._text and not self._connected:
            result = self.probe(address)
            reached = result.status == "PASS"
            return TransportError(
                f"the SuperNode gave up connecting to the aggregator at {address}"
                + ("" if reached else f": {result.detail}"),
                hint=f"see {self.log_file}" if reached else UNREACHABLE_FIX,
            )
        tail = " | ".join(line.strip() for line in self._text.splitlines() if line.strip())
        return TransportError(
            f"the SuperNode exited with code {code}",
            hint=f"see {self.log_file}: {tail[-400:]}",
        )

    def _warn_unreachable(self) -> None:
        address = self.transport.superlink_address
        result = self.probe(address)
        if result.status == "PASS":
            self.say(
                f"warning: connection attempts to the aggregator at {address} fail; retrying "
                f"(see {self.log_file})"
            )
        else:
            self.say(f"warning: {result.detail}; retrying (hint: {UNREACHABLE_FIX})")
        self._warned = True

    def _read_new(self) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return ""
        self._offset += len(data)
        new = data.decode("utf-8", errors="replace")
        # a refusal is logged in the node's first lines; a service's whole log is not kept
        self._text = (self._text + new)[-_KEPT_CHARS:]
        return new
