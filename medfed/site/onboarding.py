"""`medfed site init`: a site's first ``site.yaml``, from its provisioning kit and its dataset.

The kit is the directory `medfed provision` wrote for this site (see
:mod:`medfed.transport.provision`): ``ca.crt``, ``node_key``/``node_key.pub``,
``ledger_key.pem``/``ledger_key.pub`` and ``site.template.yaml``, which names the site and the
aggregator's address. The written file refers to the kit's files and the manifest by absolute
path, so it does not matter where the operator keeps it.

Every setting is written with a comment taken from the pydantic models of
:mod:`medfed.config.site` (section docstrings, field descriptions, allowed values), so a
setting added to the models later shows up here without touching this module. Settings the
operator rarely changes are written commented out with their default, so that the defaults of a
later medfed version still apply to them; the transport, data, privacy, paths and policy
settings are written out, because they are what the site agrees to.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from medfed.config.loading import format_validation_error
from medfed.config.site import PrivacySection, SiteConfig
from medfed.errors import ConfigError
from medfed.storage import replace_file

KIT_TEMPLATE = "site.template.yaml"
# What `medfed provision` puts in every site's kit (name -> what it is, for error messages).
KIT_FILES: Mapping[str, str] = {
    "ca.crt": "the federation CA certificate",
    "node_key": "the node's private key",
    "node_key.pub": "the node's public key",
    "ledger_key.pem": "the privacy ledger's signing key",
    KIT_TEMPLATE: "the site template with the aggregator's address",
}
_WIDTH = 96


@dataclass(frozen=True)
class SiteKit:
    """A site's provisioning kit, read and checked."""

    root: Path
    site_id: str
    superlink_address: str
    ca_cert: Path
    node_private_key: Path
    node_public_key: Path
    ledger_key: Path


@dataclass(frozen=True)
class InitResult:
    """What `medfed site init` wrote."""

    path: Path
    site_id: str
    superlink_address: str
    n_cases: int
    workdir: Path


def read_kit(kit_dir: Path) -> SiteKit:
    """The kit in ``kit_dir``; :class:`ConfigError` naming every missing file."""
    root = Path(kit_dir).expanduser().absolute()
    hint = "give the directory `medfed provision` made for this site (sites/<site-id>/ in the "
    hint += "aggregator's workspace), copied whole"
    if not root.is_dir():
        raise ConfigError(f"{root}: no such kit directory", hint=hint)
    missing = [
        f"{name} ({what})" for name, what in KIT_FILES.items() if not (root / name).is_file()
    ]
    if missing:
        raise ConfigError(f"{root}: kit incomplete, missing {'; '.join(missing)}", hint=hint)
    template = root / KIT_TEMPLATE
    try:
        data = yaml.safe_load(template.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{template}: cannot be read ({exc})", hint=hint) from None
    site_id = data.get("site_id") if isinstance(data, dict) else None
    transport = data.get("transport") if isinstance(data, dict) else None
    address = transport.get("superlink_address") if isinstance(transport, dict) else None
    if not isinstance(site_id, str) or not isinstance(address, str):
        raise ConfigError(
            f"{template}: no site_id or transport.superlink_address", hint="re-provision the kit"
        )
    return SiteKit(
        root=root,
        site_id=site_id,
        superlink_address=address,
        ca_cert=root / "ca.crt",
        node_private_key=root / "node_key",
        node_public_key=root / "node_key.pub",
        ledger_key=root / "ledger_key.pem",
    )


def init_site(
    *,
    kit: Path,
    manifest: Path,
    out: Path,
    force: bool = False,
    workdir: Path | None = None,
    epsilon_cap: float | None = None,
    delta: float | None = None,
    noise_multiplier: float | None = None,
    now: dt.datetime | None = None,
) -> InitResult:
    """Write ``out`` from the kit and the manifest; refuse to replace a file unless ``force``.

    ``workdir`` defaults to ``medfed-work-<site id>`` next to ``out``, so that the configs of two
    sites written into one directory never share a ledger; a work directory whose ledger belongs
    to another site is refused. The privacy settings default to the
    models' defaults. The text is validated as a :class:`SiteConfig` before it is written, and
    written atomically (a failed run leaves no half file).
    """
    from medfed.data.manifest import load_manifest

    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise ConfigError(
            f"{out} already exists", hint="choose another --out, or pass --force to replace it"
        )
    if out.exists() and not out.is_file():
        raise ConfigError(f"{out} exists and is not a file", hint="choose another --out")
    site_kit = read_kit(kit)
    manifest = Path(manifest).expanduser().absolute()
    if not manifest.is_file():
        raise ConfigError(
            f"{manifest}: no such manifest file",
            hint="give the CSV or YAML manifest of this site's cases (patient_id,image,label)",
        )
    n_cases = len(load_manifest(manifest))  # a DataError says what is wrong with it
    chosen_delta = delta if delta is not None else PrivacySection.model_fields["delta"].default
    if n_cases and chosen_delta >= 1 / n_cases:
        raise ConfigError(
            f"delta {chosen_delta:g} is not below 1/{n_cases}, one over the number of patients "
            "in the manifest: one patient's data could be released outright",
            hint=f"pass a smaller --delta, e.g. {10 ** math.floor(math.log10(0.1 / n_cases)):g}",
        )
    work = (
        Path(workdir).expanduser().absolute()
        if workdir
        else out.parent / f"medfed-work-{site_kit.site_id}"
    )
    _check_workdir_owner(work, site_kit.site_id)
    text = render_site_config(
        kit=site_kit,
        manifest=manifest,
        workdir=work,
        n_cases=n_cases,
        epsilon_cap=epsilon_cap,
        delta=delta,
        noise_multiplier=noise_multiplier,
        now=now or dt.datetime.now(dt.UTC),
    )
    _validate(text, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No secrets in it, but it names where the data and keys are: not for every local user.
    replace_file(out, text.encode("utf-8"), mode=0o640)
    return InitResult(
        path=out,
        site_id=site_kit.site_id,
        superlink_address=site_kit.superlink_address,
        n_cases=n_cases,
        workdir=work,
    )


def _check_workdir_owner(work: Path, site_id: str) -> None:
    """Refuse a work directory that already holds another site's ledger."""
    from medfed.privacy.ledger_head import head_path
    from medfed.storage import read_json_object

    head = head_path(work / "ledger.jsonl")
    try:
        owner = (read_json_object(head) or {}).get("site_id") if head.is_file() else None
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, str) and owner != site_id:
        raise ConfigError(
            f"{work} holds the privacy ledger of site {owner!r}, not {site_id!r}: two sites "
            "must never share a work directory",
            hint="pass another --workdir (or leave it out for medfed-work-<site id>)",
        )


def render_site_config(
    *,
    kit: SiteKit,
    manifest: Path,
    workdir: Path,
    n_cases: int,
    epsilon_cap: float | None = None,
    delta: float | None = None,
    noise_multiplier: float | None = None,
    now: dt.datetime,
) -> str:
    """The commented YAML text of a new site config (not yet validated)."""
    privacy_fields = PrivacySection.model_fields
    chosen_delta = delta if delta is not None else privacy_fields["delta"].default
    cap = epsilon_cap if epsilon_cap is not None else privacy_fields["epsilon_cap"].default
    values: dict[str, dict[str, Any]] = {
        "transport": {
            "superlink_address": kit.superlink_address,
            "root_certificates": kit.ca_cert,
            "node_private_key": kit.node_private_key,
            "node_public_key": kit.node_public_key,
        },
        "data": {"manifest": manifest},
        "privacy": {
            "noise_multiplier": noise_multiplier if noise_multiplier is not None else 1.0,
            "max_grad_norm": privacy_fields["max_grad_norm"].default,
            "delta": chosen_delta,
            "epsilon_cap": cap,
            "accountant": privacy_fields["accountant"].default,
        },
        "paths": {"workdir": workdir, "signing_key": kit.ledger_key},
        "policy": {"max_epsilon_per_round": cap / 4.0},
    }
    notes = {
        ("privacy", "noise_multiplier"): "Set this or target_epsilon_per_round, not both.",
        ("privacy", "target_epsilon_per_round"): "Instead of noise_multiplier.",
        ("privacy", "delta"): f"The manifest lists {n_cases} patients: keep delta below "
        f"1/{n_cases} = {1 / max(n_cases, 1):.2g}.",
        ("privacy", "epsilon_cap"): "Agreed with the federation; the node refuses every round "
        "that would pass it, for the whole life of this data.",
        ("paths", "workdir"): "Local disk: status, logs, cache and the privacy ledger (back up "
        "the ledger with the signing key).",
        ("paths", "signing_key"): "Private (mode 0600); a new key cannot continue an existing "
        "ledger.",
        ("transport", "node_private_key"): "Private (mode 0600), on this machine only.",
        ("policy", "max_epsilon_per_round"): "A quarter of the cap here.",
    }
    # Written out with their defaults: what the site allows, and what may leave it, is
    # explicit in its own file.
    explicit_sections = {"policy", "release"}
    header = f"""\
# medfed site configuration for site {json.dumps(kit.site_id)}
# Written by `medfed site init` on {now.replace(microsecond=0).isoformat()} from the kit in
# {kit.root}
#
# Safe by default: the node only connects over TLS, verified with transport.root_certificates,
# and identifies itself with transport.node_private_key; medfed starts Flower with telemetry
# and update checks off (FLWR_TELEMETRY_ENABLED=0), so nothing but the federation's own
# traffic leaves this machine. Patient images never leave it.
#
# Lines starting with '# key:' are settings left at their default; remove the '#' to change one.
# Next: `medfed site check --config THIS-FILE`, then `medfed site start --config THIS-FILE`.
"""
    lines = [header.rstrip("\n")]
    for name, field in SiteConfig.model_fields.items():
        section = _section_model(field)
        if section is None:
            lines += _field_lines(
                name, field, {"site_id": kit.site_id}, notes={}, explicit=True, indent=""
            )
            continue
        lines.append("")
        lines += _section_lines(
            name,
            section,
            values.get(name, {}),
            notes={key: text for (sec, key), text in notes.items() if sec == name},
            explicit=name in explicit_sections,
        )
    return "\n".join(lines) + "\n"


# --- rendering ---------------------------------------------------------------------------------


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section field (``X`` or ``X | None``), None for a plain setting."""
    candidates = [field.annotation]
    if isinstance(field.annotation, types.UnionType) or typing.get_origin(field.annotation) in (
        typing.Union,
    ):
        candidates = list(typing.get_args(field.annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _section_lines(
    name: str,
    model: type[BaseModel],
    values: Mapping[str, Any],
    *,
    notes: Mapping[str, str],
    explicit: bool,
) -> list[str]:
    lines = [f"# {line}" for line in _wrap(_doc(model), width=_WIDTH - 2)]
    active = explicit or bool(values)
    lines.append(f"{name}:" if active else f"# {name}:")
    for key, field in model.model_fields.items():
        lines += _field_lines(key, field, values, notes=notes, explicit=explicit, indent="  ")
    return lines


def _field_lines(
    key: str,
    field: FieldInfo,
    values: Mapping[str, Any],
    *,
    notes: Mapping[str, str],
    explicit: bool,
    indent: str,
) -> list[str]:
    comment = " ".join(part for part in (_describe(field), notes.get(key, "")) if part)
    lines = [f"{indent}# {line}" for line in _wrap(comment, width=_WIDTH - len(indent) - 2)]
    if key in values:
        lines.append(f"{indent}{key}: {_yaml_value(values[key])}")
    elif field.is_required():
        # Only reached if the models gain a required setting this module does not know yet.
        lines.append(f"{indent}{key}: CHANGE-ME")
    else:
        default = _yaml_value(field.get_default(call_default_factory=True))
        lines.append(f"{indent}{key}: {default}" if explicit else f"{indent}# {key}: {default}")
    return lines


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def _describe(field: FieldInfo) -> str:
    text = (field.description or "").strip()
    choices = _choices(field.annotation)
    if choices:
        text = f"{text} One of: {', '.join(choices)}." if text else f"One of: {', '.join(choices)}."
    return text


def _choices(annotation: Any) -> list[str]:
    """Allowed values of a Literal setting (also inside list[...] or ``| None``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    if origin in (list, typing.Union, types.UnionType):
        found: list[str] = []
        for arg in typing.get_args(annotation):
            found += [c for c in _choices(arg) if c not in found]
        return found
    return []


def _wrap(text: str, *, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(width, 40)) if text else []


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style that reads back as the same type (strings quoted)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON strings are YAML: "1e5", "null", "yes" stay strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {_yaml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to YAML")


def _yaml_float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value)
    # PyYAML (YAML 1.1) reads 1e-05 as a string: the mantissa needs a dot.
    if "e" in text:
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exponent[0] not in "+-":
            exponent = "+" + exponent
        text = f"{mantissa}e{exponent}"
    return text


def _validate(text: str, out: Path) -> None:
    try:
        SiteConfig.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        raise ConfigError(
            "the settings given do not make a valid site config:\n"
            + format_validation_error(out, exc),
            hint="fix the options listed above (e.g. --epsilon-cap must be > 0)",
        ) from None
