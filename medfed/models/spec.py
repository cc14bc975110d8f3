"""What network a site trains, as a small frozen value that travels with every checkpoint.

A :class:`ModelSpec` is everything needed to rebuild the same network with the same parameter
names and shapes; it is stored as JSON next to the weights so that a checkpoint never depends on
pickled code. :func:`spec_from_config` derives it from a site's configuration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from medfed.errors import ModelError

if TYPE_CHECKING:
    from medfed.config.site import SiteConfig

Network = Literal["unet", "attention_unet"]
Norm = Literal["instance", "group"]

_NETWORKS: tuple[str, ...] = get_args(Network)
_NORMS: tuple[str, ...] = get_args(Norm)
_FIELDS = (
    "network",
    "spatial_dims",
    "in_channels",
    "out_channels",
    "channels",
    "strides",
    "num_res_units",
    "norm",
)


def _is_int(value: object, *, at_least: int | None = None) -> bool:
    # bool is an int subclass; `true` in a JSON spec is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return at_least is None or value >= at_least


def _int_list(value: object, *, min_length: int) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) >= min_length
        and all(_is_int(item, at_least=1) for item in value)
    )


def _problems(data: Mapping[str, Any]) -> list[str]:
    """Every reason ``data`` is not a valid spec, one line each (empty when it is valid)."""
    problems = [f"{key}: unknown field" for key in data if key not in _FIELDS]
    problems += [f"{key}: missing" for key in _FIELDS if key not in data]

    def check(key: str, ok: bool, message: str) -> None:
        if key in data and not ok:
            problems.append(f"{key}: {message} (got {data[key]!r})")

    check("network", data.get("network") in _NETWORKS, f"must be one of {', '.join(_NETWORKS)}")
    dims = data.get("spatial_dims")
    check("spatial_dims", _is_int(dims) and dims in (2, 3), "must be 2 or 3")
    check("in_channels", _is_int(data.get("in_channels"), at_least=1), "must be an integer >= 1")
    check("out_channels", _is_int(data.get("out_channels"), at_least=2), "must be an integer >= 2")
    channels: Any = data.get("channels")
    strides: Any = data.get("strides")
    channels_ok = _int_list(channels, min_length=2)
    strides_ok = _int_list(strides, min_length=1)
    check("channels", channels_ok, "must be a list of at least 2 integers >= 1")
    check("strides", strides_ok, "must be a list of at least 1 integer >= 1")
    if channels_ok and strides_ok and len(strides) != len(channels) - 1:
        problems.append(
            f"strides: must have one entry fewer than channels "
            f"({len(strides)} strides for {len(channels)} channels)"
        )
    units = data.get("num_res_units")
    check("num_res_units", _is_int(units, at_least=0), "must be an integer >= 0")
    check("norm", data.get("norm") in _NORMS, f"must be one of {', '.join(_NORMS)}")
    return problems


@dataclass(frozen=True)
class ModelSpec:
    """A segmentation network's architecture: enough to rebuild it exactly.

    ``norm`` and ``num_res_units`` shape MONAI's ``UNet``. ``attention_unet`` uses MONAI's own
    blocks (ReLU, BatchNorm made DP-safe as GroupNorm by Opacus' ``ModuleValidator.fix``) and
    takes neither; they are kept so that one configuration file describes either network.
    """

    network: Network
    spatial_dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    norm: Norm

    def __post_init__(self) -> None:
        # Lists are accepted for convenience, but a frozen value must hold tuples to be hashable.
        for name in ("channels", "strides"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        problems = _problems({name: getattr(self, name) for name in _FIELDS})
        if problems:
            raise ModelError(
                "invalid model spec: " + "; ".join(problems),
                hint="fix the model section of the site configuration",
            )

    @property
    def downsampling(self) -> int:
        """The factor every spatial input size must be divisible by."""
        return math.prod(self.strides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (lists, not tuples)."""
        return {
            "network": self.network,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": self.num_res_units,
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model spec") -> ModelSpec:
        """Validate ``data`` and build a spec; every bad field is named in one ModelError."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: expected a mapping, got {type(data).__name__}")
        problems = _problems(data)
        if problems:
            raise ModelError(
                f"{source}: invalid model spec: " + "; ".join(problems),
                hint="the checkpoint or spec file was edited or written by another version",
            )
        return cls(
            network=cast(Network, data["network"]),
            spatial_dims=int(data["spatial_dims"]),
            in_channels=int(data["in_channels"]),
            out_channels=int(data["out_channels"]),
            channels=tuple(int(c) for c in data["channels"]),
            strides=tuple(int(s) for s in data["strides"]),
            num_res_units=int(data["num_res_units"]),
            norm=cast(Norm, data["norm"]),
        )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), stable enough to hash or compare."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "model spec") -> ModelSpec:
        """Parse and validate JSON written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_config(cls, config: SiteConfig) -> ModelSpec:
        """The spec a site's configuration asks for (see :func:`spec_from_config`)."""
        return spec_from_config(config)


def spec_from_config(config: SiteConfig) -> ModelSpec:
    """The network a site's configuration describes.

    Images are single-channel; one output channel per label class; 2D or 3D follows the number
    of ``data.patch_size`` entries. The patch size must survive the network's down- and
    up-sampling unchanged, otherwise skip connections cannot be concatenated.
    """
    model = config.model
    spec = ModelSpec(
        network=model.network,
        spatial_dims=config.spatial_dims,
        in_channels=1,
        out_channels=len(config.data.classes),
        channels=tuple(model.channels),
        strides=tuple(model.strides),
        num_res_units=model.num_res_units,
        norm=model.norm,
    )
    factor = spec.downsampling
    bad = [size for size in config.data.patch_size if size % factor]
    if bad:
        raise ModelError(
            f"data.patch_size {list(config.data.patch_size)} does not fit model.strides "
            f"{list(spec.strides)}: every entry must be divisible by {factor} (not {bad})",
            hint=f"use a patch size that is a multiple of {factor}, e.g. "
            f"{[max(factor, round(s / factor) * factor) for s in config.data.patch_size]}",
        )
    return spec
