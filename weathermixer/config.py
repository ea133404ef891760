"""WeatherMixer model configuration: one validated dataclass and the named presets.

Grid handling: ``lat`` x ``lon`` is the grid as stored (e.g. 721 x 1440 for 0.25 deg
ERA5). The model works on ``model_lat`` x ``model_lon``, a multiple of the patch: with
``grid_policy="crop"`` the last rows are dropped (721 -> 720, as in the paper), with
``"pad"`` zero rows are appended. Longitude must be divisible by the patch (it is periodic
and never cropped).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what was expected."""


@dataclass(frozen=True)
class ModelConfig:
    # grid as stored, and how it is made a multiple of the patch
    lat: int = 33
    lon: int = 64
    grid_policy: Literal["crop", "pad"] = "crop"
    # channels: prognostic state in/out, static fields, time features (forcings)
    in_channels: int = 8
    out_channels: int = 8
    static_channels: int = 2
    forcing_channels: int = 4
    # patches: (rows, columns); the paper uses 1-D patches along longitude
    patch: tuple[int, int] = (1, 8)
    # mixer
    hidden: int = 64
    depth: int = 2
    token_fraction: float = 0.5  # token-MLP hidden = token_fraction * n_tokens
    channel_fraction: float = 1.0  # channel-MLP hidden = channel_fraction * hidden
    dropout: float = 0.0
    decoder_skip: bool = True  # concatenate the embedding output to the final latent before recovery
    residual: Literal["linear", "add"] = "linear"
    latent_steps: int = 1  # block-stack repeats per forecast step (latent rollout), decoded once
    activation_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form provenance

    def __post_init__(self) -> None:
        for key in ("lat", "lon", "in_channels", "out_channels", "hidden", "depth", "latent_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"model.{key} = {getattr(self, key)!r}: expected a positive integer")
        for key in ("static_channels", "forcing_channels"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"model.{key} = {getattr(self, key)!r}: expected an integer >= 0")
        if len(self.patch) != 2 or any(not isinstance(p, int) or p < 1 for p in self.patch):
            raise ConfigError(f"model.patch = {self.patch!r}: expected two positive integers (rows, columns)")
        if self.grid_policy not in ("crop", "pad"):
            raise ConfigError(f"model.grid_policy = {self.grid_policy!r}: expected 'crop' or 'pad'")
        if self.lon % self.patch[1]:
            raise ConfigError(f"model.patch columns {self.patch[1]} do not divide model.lon = {self.lon}: "
                              f"expected a divisor of {self.lon} (longitude is periodic and never cropped)")
        if self.model_lat < self.patch[0]:
            raise ConfigError(f"model.lat = {self.lat} is smaller than the patch rows {self.patch[0]}")
        if not 0 < self.token_fraction <= 8:
            raise ConfigError(f"model.token_fraction = {self.token_fraction}: expected a value in (0, 8]")
        if not 0 < self.channel_fraction <= 8:
            raise ConfigError(f"model.channel_fraction = {self.channel_fraction}: expected a value in (0, 8]")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout = {self.dropout}: expected a value in [0, 1)")
        if self.residual not in ("linear", "add"):
            raise ConfigError(f"model.residual = {self.residual!r}: expected 'linear' or 'add'")
        if self.residual == "add" and self.in_channels != self.out_channels:
            raise ConfigError(f"model.residual = 'add' needs in_channels == out_channels, got "
                              f"{self.in_channels} and {self.out_channels}; use residual = 'linear'")

    # derived sizes -------------------------------------------------------------------
    @property
    def model_lat(self) -> int:
        rows = self.patch[0]
        return (self.lat // rows) * rows if self.grid_policy == "crop" else math.ceil(self.lat / rows) * rows

    @property
    def model_lon(self) -> int:
        return self.lon

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.model_lat // self.patch[0], self.model_lon // self.patch[1]

    @property
    def n_tokens(self) -> int:
        rows, cols = self.token_grid
        return rows * cols

    @property
    def input_channels(self) -> int:
        """Channels entering the patch embedding: state, static fields, forcings."""
        return self.in_channels + self.static_channels + self.forcing_channels

    @property
    def patch_size(self) -> int:
        return self.patch[0] * self.patch[1]

    @property
    def token_hidden(self) -> int:
        return max(1, round(self.token_fraction * self.n_tokens))

    @property
    def channel_hidden(self) -> int:
        return max(1, round(self.channel_fraction * self.hidden))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch"] = list(self.patch)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"model: unknown keys {unknown}; expected some of "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        values = dict(values)
        if "patch" in values:
            values["patch"] = tuple(values["patch"])
        return cls(**values)


# ERA5 at 0.25 deg: 4 surface + 5 upper-air variables x 13 levels = 69 channels, 3 static fields
_ERA5_025 = dict(lat=721, lon=1440, in_channels=69, out_channels=69, static_channels=3, forcing_channels=0,
                 patch=(1, 60), depth=3, channel_fraction=1.0)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(lat=9, lon=16, in_channels=3, out_channels=3, static_channels=1, forcing_channels=2,
                        patch=(1, 4), hidden=8, depth=2, token_fraction=0.5),
    "demo": ModelConfig(lat=33, lon=64, in_channels=8, out_channels=8, static_channels=2, forcing_channels=4,
                        patch=(1, 4), hidden=128, depth=3, token_fraction=0.5),
    "jigsaw-1b": ModelConfig(**_ERA5_025, hidden=4320, token_fraction=0.5),
    "jigsaw-1.4b": ModelConfig(**_ERA5_025, hidden=8192, token_fraction=0.5),
    "jigsaw-2.6b": ModelConfig(**_ERA5_025, hidden=10352, token_fraction=1.0),
    "jigsaw-3.2b": ModelConfig(**_ERA5_025, hidden=12288, token_fraction=1.25),
    # 0.125 deg (1441 x 2880): patches of 120 keep the token count of the 0.25 deg models
    "jigsaw-1b-0125": ModelConfig(**{**_ERA5_025, "lat": 1441, "lon": 2880, "patch": (2, 60)},
                                  hidden=4320, token_fraction=0.125),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} unknown; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
