"""The zarr store contract shared by the preprocessor (writer) and the tile reader.

A store is a zarr v3 group written by xarray (``consolidated=False``):

* coordinates ``time`` (datetime64[ns], ascending, regular step), ``level`` (int hPa,
  ascending), ``latitude`` (degrees_north, ascending -90..90), ``longitude``
  (degrees_east, ascending in [0, 360));
* upper-air variables ``(time, level, latitude, longitude)`` float32, surface variables
  ``(time, latitude, longitude)`` float32, static variables ``(latitude, longitude)``
  float32 - under canonical short names where the schema knows them (:data:`UPPER_AIR`,
  :data:`SURFACE`, :data:`STATIC`), otherwise the input's names, with CF attributes;
* an ensemble store (``members`` in the root attributes) has a ``member`` dimension after
  ``time`` in every dynamic variable, one chunk per member, and statistics pooled over members;
* chunks ``time=1``, ``level=1`` and spatial chunks equal to one tile of the declared tile
  grid, so a rank reading its tile and channel slice reads exactly its own chunks;
  compressed with Blosc lz4 + byte shuffle (:func:`field_encoding`; readers take any codec);
* root attributes listed in :class:`StoreAttrs` (the channel list in model order,
  per-channel statistics, provenance) and ``complete = True`` written last.

A *channel* is one 2-D field: ``(variable, level)`` for upper-air variables and
``(variable, None)`` for surface ones. Model order: surface variables first, then
upper-air variables by variable and ascending level.
"""

from __future__ import annotations

import hashlib
import json

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# canonical short name -> (long name, units)
UPPER_AIR: dict[str, tuple[str, str]] = {
    "z": ("Geopotential", "m**2 s**-2"),
    "t": ("Temperature", "K"),
    "u": ("U component of wind", "m s**-1"),
    "v": ("V component of wind", "m s**-1"),
    "q": ("Specific humidity", "kg kg**-1"),
}
SURFACE: dict[str, tuple[str, str]] = {
    "msl": ("Mean sea level pressure", "Pa"),
    "u10": ("10 metre U wind component", "m s**-1"),
    "v10": ("10 metre V wind component", "m s**-1"),
    "t2m": ("2 metre temperature", "K"),
}
STATIC: dict[str, tuple[str, str]] = {
    "lsm": ("Land-sea mask", "(0 - 1)"),
    "orography": ("Surface geopotential", "m**2 s**-2"),
    "slt": ("Soil type", "~"),  # ERA5 category code 0..7, kept as a number like the paper's input
}

# headline channels for validation and evaluation tables
HEADLINE_CHANNELS = ("z500", "t850", "t2m", "u10")


class StoreError(ValueError):
    """A store that does not follow the contract (names the store and what is wrong)."""


@dataclass(frozen=True)
class Channel:
    variable: str
    level: int | None = None

    @property
    def name(self) -> str:
        """``z500`` for upper-air channels, ``t2m`` for surface ones."""
        return self.variable if self.level is None else f"{self.variable}{self.level}"

    def to_json(self) -> dict[str, Any]:
        return {"variable": self.variable, "level": self.level}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> "Channel":
        return cls(item["variable"], item["level"])


def field_encoding(dims: tuple[str, ...], spatial_chunks: tuple[int, int], compressed: bool = True) -> dict[str, Any]:
    """xarray's zarr encoding of a field with dimensions ``dims``: chunks of one time step,
    one level and one tile, and the store's codec.

    Blosc lz4 with byte shuffle: on float32 weather fields it decodes ~7x faster per core
    than zarr's default (zstd level 0: 9.6 against 1.4 GB/s) at a better ratio (0.61 against
    0.81), and decoding is what bounds the tile reader at 0.25 deg (``benchmarks/READER.md``).
    """
    from zarr.codecs import BloscCodec, BloscShuffle

    sizes = {"time": 1, "member": 1, "level": 1, "latitude": spatial_chunks[0], "longitude": spatial_chunks[1]}
    compressors = (BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),) if compressed else None
    return {"chunks": tuple(sizes[d] for d in dims), "compressors": compressors}


def model_channel_order(surface: list[str], upper_air: list[str], levels: list[int]) -> list[Channel]:
    """Surface variables first, then upper-air variables by variable and ascending level."""
    return [Channel(v) for v in surface] + [Channel(v, int(lev)) for v in upper_air for lev in sorted(levels)]


@dataclass
class StoreAttrs:
    """Root attributes of a store; ``complete`` is set to True only when the write finished."""

    channels: list[Channel]
    static_channels: list[str]
    time_step_hours: int
    tile_grid: tuple[int, int]
    mean: list[float] = field(default_factory=list)  # per channel, over the statistics period
    std: list[float] = field(default_factory=list)
    tendency_std: list[float] = field(default_factory=list)  # std of x(t+step) - x(t)
    static_mean: list[float] = field(default_factory=list)
    static_std: list[float] = field(default_factory=list)
    statistics_period: tuple[str, str] | None = None  # ISO dates, inclusive
    sources: list[dict[str, Any]] = field(default_factory=list)  # {path, size, sha256}
    members: list[int] | None = None  # ensemble member labels of a store with a member dimension
    complete: bool = False
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = [c.to_json() for c in self.channels]
        out["tile_grid"] = list(self.tile_grid)
        out["statistics_period"] = list(self.statistics_period) if self.statistics_period else None
        return out

    @classmethod
    def from_json(cls, attrs: dict[str, Any], store: str = "<store>") -> "StoreAttrs":
        missing = [k for k in ("schema_version", "channels", "static_channels", "time_step_hours", "tile_grid")
                   if k not in attrs]
        if missing:
            raise StoreError(f"{store}: root attributes {missing} missing; is this a store written by "
                             f"launch/preprocess.py?")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise StoreError(f"{store}: schema_version {attrs['schema_version']}, expected {SCHEMA_VERSION}")
        kwargs = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
        kwargs["channels"] = [Channel.from_json(c) for c in attrs["channels"]]
        kwargs["tile_grid"] = tuple(attrs["tile_grid"])
        if attrs.get("statistics_period"):
            kwargs["statistics_period"] = tuple(attrs["statistics_period"])
        return cls(**kwargs)

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    def fingerprint(self) -> str:
        """Hash of what a model trained on the store depends on: channels, static fields,
        statistics, time step (checkpoints record it; resuming on another store is refused)."""
        content = json.dumps({"channels": [c.to_json() for c in self.channels], "static": list(self.static_channels),
                              "mean": self.mean, "std": self.std, "static_mean": self.static_mean,
                              "static_std": self.static_std, "step": self.time_step_hours}, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]
