"""Reading configuration files: YAML in, validated pydantic models out, every problem at once.

Each problem is one line, ``FILE:LINE: dotted.key: what is wrong``, with the line of the key
(or of its value) in the file, and for a key the file's section does not know, the known key
closest to it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medfed.config.site import SiteConfig
from medfed.errors import ConfigError

Loc = tuple[int | str, ...]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found", hint="check the path given with --config"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read ({exc.strerror})", hint="check permissions"
        ) from None


def _parse(path: Path, text: str) -> dict[str, Any]:
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


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every way it can fail into a :class:`ConfigError`."""
    return _parse(path, _read_text(path))


def format_validation_error(
    path: Path,
    error: ValidationError,
    *,
    document: yaml.Node | None = None,
    model: type[BaseModel] | None = None,
) -> str:
    """Every problem pydantic found, one per line, each naming its dotted key.

    With the file's composed YAML ``document`` each line names the line of the key or value
    (``FILE:LINE: key: ...``); with the ``model`` that was validated, an unknown key is
    followed by the known key of its section that is closest to it.
    """
    lines = []
    for item in error.errors():
        loc: Loc = tuple(item["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
            known = None if model is None else _known_keys(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known or [], n=1) if loc else []
            if close:
                message += f"; did you mean {close[0]}?"
        line = None if document is None else _line_of(document, loc, item["type"])
        where = f"{path}:{line}" if line is not None else f"{path}"
        lines.append(f"{where}: {key}: {message}")
    return "\n".join(lines)


def _line_of(document: yaml.Node, loc: Loc, kind: str) -> int | None:
    """The 1-based line of ``loc`` in the file: the key's for an unknown key or a section, the
    value's for a bad value, the nearest section's for a missing key."""
    node = document
    line: int | None = None
    for part in loc:
        key_node, value_node = _child(node, part)
        if value_node is None:
            return line
        line = (key_node or value_node).start_mark.line + 1
        node = value_node
    if kind != "extra_forbidden" and isinstance(node, yaml.ScalarNode):
        return int(node.start_mark.line) + 1
    return line


def _child(node: yaml.Node, part: int | str) -> tuple[yaml.Node | None, yaml.Node | None]:
    """The key and value nodes of item ``part`` of a mapping or sequence node."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        return None, node.value[part]
    return None, None


def _known_keys(model: type[BaseModel], loc: Loc) -> list[str] | None:
    """The keys of the section at ``loc`` (None where it is not a section of ``model``)."""
    annotation: Any = model
    for part in loc:
        annotation = _inside(annotation, part)
        if annotation is None:
            return None
    section = _model_of(annotation)
    return None if section is None else list(section.model_fields)


def _inside(annotation: Any, part: int | str) -> Any:
    """The type of item ``part`` of a value of type ``annotation``."""
    for option in _options(annotation):
        origin = typing.get_origin(option)
        args = typing.get_args(option)
        section = _model_of(option)
        if isinstance(part, str) and section is not None and part in section.model_fields:
            return section.model_fields[part].annotation
        if isinstance(part, int) and origin in (list, tuple, Sequence) and args:
            return args[0]
        if isinstance(part, str) and origin in (dict, Mapping) and len(args) == 2:
            return args[1]
    return None


def _options(annotation: Any) -> tuple[Any, ...]:
    """The members of ``X | Y | None`` (without None); the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def _resolve(base: Path, value: Path | None) -> Path | None:
    if value is None:
        return None
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()


def load_site_config(path: Path | str) -> SiteConfig:
    """Load ``site.yaml``; relative paths are taken from the file's own directory."""
    path = Path(path)
    text = _read_text(path)
    raw = _parse(path, text)
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        count = exc.error_count()
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        raise ConfigError(
            f"{count} problem{'s' if count != 1 else ''} in site config:\n"
            + format_validation_error(path, exc, document=document, model=SiteConfig),
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
