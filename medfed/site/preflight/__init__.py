"""`medfed site check`: everything a site node needs, checked before it goes live.

Each check is a small function that returns a :class:`CheckResult` (PASS, WARN or FAIL, a
one-line detail and, unless it passed, the fix); :func:`run_preflight` runs them in order and
the CLI only renders the report. Any FAIL makes `medfed site check` exit with
:data:`PREFLIGHT_FAILED_EXIT_CODE`.

The checks live by what they look at: :mod:`.credentials` (config, keys, CA), :mod:`.network`
(the aggregator: reachability, TLS, registration), :mod:`.site_state` (dataset, ledger and
budget, disk) and :mod:`.environment` (compute, versions); :mod:`.result` holds the types.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from medfed.config.site import SiteConfig
from medfed.site.preflight.credentials import (
    CERT_WARN_DAYS,
    check_ca,
    check_config,
    check_key_permissions,
    check_ledger_key,
    check_node_key,
)
from medfed.site.preflight.environment import (
    check_compute,
    check_versions,
    cuda_device_name,
    installed_version,
    medfed_requirements,
)
from medfed.site.preflight.network import (
    DEFAULT_TIMEOUT_S,
    check_reachable,
    check_registration,
    check_tls,
    split_address,
)
from medfed.site.preflight.result import (
    PREFLIGHT_FAILED_EXIT_CODE,
    CheckResult,
    PreflightReport,
    Status,
    _fail,
    _warn,
)
from medfed.site.preflight.site_state import (
    BUDGET_WARN_FRACTION,
    DEFAULT_MIN_FREE_BYTES,
    check_data,
    check_disk,
    check_ledger,
    check_receipt,
    check_witness,
)

__all__ = [
    "BUDGET_WARN_FRACTION",
    "CERT_WARN_DAYS",
    "DEFAULT_MIN_FREE_BYTES",
    "DEFAULT_TIMEOUT_S",
    "PREFLIGHT_FAILED_EXIT_CODE",
    "CheckResult",
    "PreflightReport",
    "Status",
    "check_ca",
    "check_compute",
    "check_config",
    "check_data",
    "check_disk",
    "check_key_permissions",
    "check_ledger",
    "check_ledger_key",
    "check_node_key",
    "check_reachable",
    "check_receipt",
    "check_registration",
    "check_tls",
    "check_versions",
    "check_witness",
    "cuda_device_name",
    "installed_version",
    "medfed_requirements",
    "run_preflight",
    "split_address",
]


def run_preflight(
    *,
    config_path: Path,
    now: dt.datetime | None = None,
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    gpu_probe: Callable[[], str | None] = cuda_device_name,
) -> PreflightReport:
    """Run every check for the site in ``config_path``."""
    moment = now or dt.datetime.now(dt.UTC)
    first, config = check_config(Path(config_path))
    results = [first]
    if config is not None:
        results += _site_checks(config, now=moment, timeout_s=timeout_s)
        results.append(check_disk(config.paths.workdir, min_free_bytes=min_free_bytes))
        device = config.training.device
    else:
        device = "auto"
    results.append(check_compute(device, probe=gpu_probe))
    results += check_versions()
    return PreflightReport(
        config_path=Path(config_path),
        site_id=None if config is None else config.site_id,
        results=tuple(results),
    )


def _site_checks(config: SiteConfig, *, now: dt.datetime, timeout_s: float) -> list[CheckResult]:
    results: list[CheckResult] = []
    transport = config.transport
    if transport is None:
        results.append(
            _fail(
                "transport",
                "no transport section: the node does not know its aggregator",
                "write the config with `medfed site init --kit KIT --data MANIFEST --out ...`",
            )
        )
    else:
        results.append(check_node_key(transport))
        ca = check_ca(transport.root_certificates, now=now)
        results.append(ca)
        address = transport.superlink_address
        reachable = check_reachable(address, timeout_s=timeout_s)
        results.append(reachable)
        if reachable.status == "FAIL":
            tls = _warn("TLS", "not checked: the aggregator is unreachable", "see above")
        elif ca.status == "FAIL" and not transport.root_certificates.is_file():
            tls = _warn("TLS", "not checked: no CA certificate", "see the CA check")
        else:
            tls = check_tls(address, ca=transport.root_certificates, timeout_s=timeout_s, now=now)
        results.append(tls)
        if tls.status == "FAIL" or reachable.status == "FAIL":
            results.append(
                _warn("node registered", "not checked: no verified TLS connection", "see above")
            )
        else:
            results.append(
                check_registration(
                    address,
                    ca=transport.root_certificates,
                    private_key=transport.node_private_key,
                    timeout_s=timeout_s,
                )
            )
    results.append(check_ledger_key(config))
    results += check_ledger(config)
    results.append(check_witness(config))
    results.append(check_receipt(config))
    results.append(check_data(config))
    return results
