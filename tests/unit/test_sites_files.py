"""The deployment files in sites/: what can be checked without systemd, podman or nginx."""

from __future__ import annotations

import re
from pathlib import Path

from medfed.config.loading import load_site_config

SITES = Path(__file__).parents[2] / "sites"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file's sections -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_the_systemd_unit_runs_the_node_unprivileged_and_stops_it_gracefully() -> None:
    from medfed.cli.service import STOP_GRACE_S

    unit = _unit((SITES / "medfed-site.service").read_text(encoding="utf-8"))
    service = unit["Service"]
    single = {key: values[-1] for key, values in service.items()}
    assert single["User"] not in ("root", "0")
    assert "medfed site start --config" in single["ExecStart"]
    assert "--log-format json" in single["ExecStart"]
    assert single["Restart"] == "on-failure"
    assert single["NoNewPrivileges"] == "yes"
    assert single["ProtectSystem"] == "strict"
    assert single["KillSignal"] == "SIGTERM"
    assert single["KillMode"] == "mixed"  # SIGTERM to the node, which stops its children
    # Long enough for the node's own grace (a round's abort) plus its start-up.
    assert _seconds(single["TimeoutStopSec"]) >= STOP_GRACE_S + 30
    assert unit["Unit"]["StartLimitBurst"] and unit["Unit"]["StartLimitIntervalSec"]
    assert service["ReadOnlyPaths"] and service["ReadWritePaths"] == ["/var/lib/medfed"]
    assert not any(p.startswith("/var/lib/medfed") for p in service["ReadOnlyPaths"])
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_container_installs_torch_first_and_runs_as_a_user() -> None:
    lines = [
        line.strip()
        for line in (SITES / "Containerfile").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    runs = [line for line in lines if line.startswith("RUN ")]
    assert "torch==2.13.0" in runs[0]
    assert any("[site]" in run for run in runs[1:])
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "site" in line for line in lines)
    assert "STOPSIGNAL SIGTERM" in lines


def _nginx_locations(text: str) -> list[str]:
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return re.findall(r"location\s+(?:[=~^*]+\s*)?(\S+)\s*\{", body)


def test_the_proxy_exposes_only_the_fleet_api() -> None:
    text = (SITES / "nginx-aggregator.conf").read_text(encoding="utf-8")
    assert text.count("{") == text.count("}")
    locations = _nginx_locations(text)
    assert sorted(locations) == ["/", "/v1/fleet/"]
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    catch_all = body[body.index("location / {") :]
    assert "return 404" in catch_all.split("}")[0] and "proxy_pass" not in catch_all
    assert "/v1/control" not in body and "/v1/runtime" not in body
    assert "proxy_ssl_verify on" in body


def test_the_fleet_paths_are_the_ones_flower_uses() -> None:
    # If Flower moved its Fleet API, the proxy (and the README) must follow.
    from flwr.superlink.routers.fleet.router import router

    assert router.prefix == "/v1/fleet"
    from flwr.superlink.routers.control.router import router as control

    assert not control.prefix.startswith("/v1/fleet")


def test_the_example_site_config_loads_and_documents_every_policy_key() -> None:
    from medfed.config.site import PolicySection

    config = load_site_config(SITES / "site.example.yaml")
    assert config.policy == PolicySection()
    text = (SITES / "site.example.yaml").read_text(encoding="utf-8")
    for key in PolicySection.model_fields:
        assert f"  {key}:" in text, key
    readme = (SITES / "README.md").read_text(encoding="utf-8")
    for key in PolicySection.model_fields:
        assert f"`{key}`" in readme, key
