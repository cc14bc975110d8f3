"""Reading configuration files: YAML in, validated pydantic models out, every problem at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every way it can fail into a :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found", hint="check the path given with --config"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read ({exc.strerror})", hint="check permissions"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML", hint="fix the syntax there") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return raw


def format_validation_error(path: Path, error: ValidationError) -> str:
    """Every problem pydantic found, one per line, each naming its dotted key."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"{path}: {key}: {message}")
    return "\n".join(lines)


def _resolve(base: Path, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def load_site_config(path: Path | str) -> SiteConfig:
    """Load ``site.yaml``; relative paths are taken from the file's own directory."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        count = exc.error_count()
        raise ConfigError(
            f"{count} problem{'s' if count != 1 else ''} in site config:\n"
            + format_validation_error(path, exc),
            hint="fix the settings listed above (see sites/site.example.yaml)",
        ) from None
    return resolve_paths(config, base=path.resolve().parent)


def resolve_paths(config: SiteConfig, *, base: Path) -> SiteConfig:
    """Make every path in ``config`` absolute, relative ones taken from ``base``."""
    data = config.data.model_copy(
        update={
            "manifest": _resolve(base, config.data.manifest),
            "cache_dir": _resolve(base, config.data.cache_dir),
        }
    )
    paths = config.paths.model_copy(
        update={
            "workdir": _resolve(base, config.paths.workdir),
            "ledger": _resolve(base, config.paths.ledger),
            "signing_key": _resolve(base, config.paths.signing_key),
            "head_witness": _resolve(base, config.paths.head_witness),
        }
    )
    transport = config.transport
    if transport is not None:
        transport = transport.model_copy(
            update={
                key: _resolve(base, getattr(transport, key))
                for key in (
                    "root_certificates",
                    "node_private_key",
                    "node_public_key",
                    "receipt_public_key",
                )
            }
        )
    return config.model_copy(update={"data": data, "paths": paths, "transport": transport})


def dump_site_config(config: SiteConfig, path: Path) -> None:
    """Write ``config`` as YAML (paths as given; callers choose relative or absolute)."""
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
