"""WeatherMixer model configuration: one validated dataclass and the named presets.

Grid handling: ``lat`` x ``lon`` is the grid as stored (e.g. 721 x 1440 for 0.25 deg
ERA5). The model works on ``model_lat`` x ``model_lon``: latitude is made a multiple of
``lcm(patch rows, lat_multiple)``; with ``grid_policy="crop"`` the last rows are dropped,
with ``"pad"`` zero rows are appended. The paper keeps 720 of the 721 rows (1-D patches of
one row, ``lat_multiple=2``). Longitude must be divisible by the patch columns (it is
periodic and never cropped).

The paper presets count only what the paper's model sees: 69 prognostic channels and 3
static fields (land-sea mask, orography, soil type), no time features. The trainer
replaces grid and channel counts with the data store's (adding its time features as
forcing channels), which adds ``60 x forcing_channels x hidden`` embedding weights;
``weathermixer.counts`` gives the exact numbers for any configuration.
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
    lat_multiple: int = 1  # model_lat is also a multiple of this (the paper: 721 -> 720 rows)
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
    token_fraction: float = 0.5  # token-MLP hidden = floor(token_fraction * n_tokens)
    channel_fraction: float = 1.0  # channel-MLP hidden = floor(channel_fraction * hidden)
    dropout: float = 0.0
    # decoder: the embedding output joins the final latent before patch recovery, either
    # concatenated (paper's default) or added before the final norm (its other option)
    decoder_skip: bool = True
    decoder_merge: Literal["concat", "add"] = "concat"
    residual: Literal["linear", "add"] = "linear"
    latent_steps: int = 1  # block-stack repeats per forecast step (latent rollout), decoded once
    activation_checkpointing: bool = False
    # Bayesian (mean-field Gaussian) layers: the groups of LAYER_GROUPS whose linear layers
    # have Gaussian weights N(mu, softplus(rho)^2); their prior N(0, prior_std^2), initial sigma
    bayesian: tuple[str, ...] = ()
    prior_std: float = 1.0
    init_sigma: float = 0.01
    # FP8 matrix products (parallel.fp8): recipe "none", "tensorwise" or "delayed", in the linear
    # layers of fp8_groups (default the mixing layers: the bulk of the FLOPs; the embedding and the
    # decoder in FP8 failed the demo's quality guard, benchmarks/FP8.md); "delayed" scales each
    # operand by the largest amax of its last fp8_history steps. The layers of fp8_backward_groups
    # (and not of fp8_groups) keep their forward product in bf16 and run its two gradient products
    # in FP8: the prediction keeps bf16's precision (default the embedding and the decoder, which
    # pass the demo's quality guard that way)
    fp8: str = "none"
    fp8_groups: tuple[str, ...] = ("token_mixing", "channel_mixing")
    fp8_backward_groups: tuple[str, ...] = ("embedding", "decoder")
    fp8_history: int = 16
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form provenance

    def __post_init__(self) -> None:
        if isinstance(self.patch, list):  # from YAML/JSON
            object.__setattr__(self, "patch", tuple(self.patch))
        object.__setattr__(self, "bayesian", _layer_groups(self.bayesian, "bayesian"))
        object.__setattr__(self, "fp8_groups", _layer_groups(self.fp8_groups, "fp8_groups"))
        object.__setattr__(self, "fp8_backward_groups", _layer_groups(self.fp8_backward_groups, "fp8_backward_groups"))
        if self.fp8 not in FP8_RECIPES:
            raise ConfigError(f"model.fp8 = {self.fp8!r}: expected one of {list(FP8_RECIPES)}")
        if isinstance(self.fp8_history, bool) or not isinstance(self.fp8_history, int) or self.fp8_history < 1:
            raise ConfigError(f"model.fp8_history = {self.fp8_history!r}: expected the number of steps of amax "
                              f"history of recipe delayed, an integer >= 1")
        for key in ("prior_std", "init_sigma"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"model.{key} = {value!r}: expected a positive number (a standard deviation)")
        for key in ("lat", "lon", "in_channels", "out_channels", "hidden", "depth", "latent_steps", "lat_multiple"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key} = {value!r}: expected a positive integer")
        for key in ("static_channels", "forcing_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{key} = {value!r}: expected an integer >= 0")
        for key in ("decoder_skip", "activation_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"model.{key} = {getattr(self, key)!r}: expected true or false")
        if (not isinstance(self.patch, tuple) or len(self.patch) != 2
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.patch)):
            raise ConfigError(f"model.patch = {self.patch!r}: expected two positive integers (rows, columns)")
        if self.grid_policy not in ("crop", "pad"):
            raise ConfigError(f"model.grid_policy = {self.grid_policy!r}: expected 'crop' or 'pad'")
        if self.lon % self.patch[1]:
            raise ConfigError(f"model.patch = {self.patch}: its columns ({self.patch[1]}) do not divide model.lon = "
                              f"{self.lon}; expected a divisor of {self.lon} (longitude is periodic and never cropped)")
        if self.model_lat < 1:
            raise ConfigError(f"model.lat = {self.lat} leaves no rows when cropped to a multiple of "
                              f"{self.lat_step} (model.patch rows {self.patch[0]}, model.lat_multiple "
                              f"{self.lat_multiple}); expected model.lat >= {self.lat_step} or grid_policy 'pad'")
        for key in ("token_fraction", "channel_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 8:
                raise ConfigError(f"model.{key} = {value!r}: expected a number in (0, 8] (the paper uses 0.5 to 1)")
        if self.token_hidden < 1:
            raise ConfigError(f"model.token_fraction = {self.token_fraction} gives no token-MLP features for "
                              f"{self.n_tokens} tokens; expected at least 1 / {self.n_tokens}")
        if self.channel_hidden < 1:
            raise ConfigError(f"model.channel_fraction = {self.channel_fraction} gives no channel-MLP features for "
                              f"hidden = {self.hidden}; expected at least 1 / {self.hidden}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout = {self.dropout!r}: expected a number in [0, 1)")
        if self.decoder_merge not in ("concat", "add"):
            raise ConfigError(f"model.decoder_merge = {self.decoder_merge!r}: expected 'concat' or 'add'")
        if self.residual not in ("linear", "add"):
            raise ConfigError(f"model.residual = {self.residual!r}: expected 'linear' or 'add'")
        if self.residual == "add" and self.in_channels != self.out_channels:
            raise ConfigError(f"model.residual = 'add' needs model.in_channels == model.out_channels, got "
                              f"{self.in_channels} and {self.out_channels}; use residual = 'linear'")

    # derived sizes -------------------------------------------------------------------
    @property
    def lat_step(self) -> int:
        return math.lcm(self.patch[0], self.lat_multiple)

    @property
    def model_lat(self) -> int:
        step = self.lat_step
        return (self.lat // step) * step if self.grid_policy == "crop" else math.ceil(self.lat / step) * step

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
        # floor, as the paper's code (int(n_tokens * fraction))
        return int(self.token_fraction * self.n_tokens)

    @property
    def channel_hidden(self) -> int:
        return int(self.channel_fraction * self.hidden)

    @property
    def is_bayesian(self) -> bool:
        return bool(self.bayesian)

    def replace(self, **changes: Any) -> "ModelConfig":
        _check_keys(changes, "model")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch"] = list(self.patch)
        out["bayesian"] = list(self.bayesian)
        out["fp8_groups"] = list(self.fp8_groups)
        out["fp8_backward_groups"] = list(self.fp8_backward_groups)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """A saved config (a checkpoint's): a key it predates takes the value that builds the
        model it was saved with, which is the default unless the default changed since."""
        _check_keys(values, "model")
        return cls(**{**SAVED_BEFORE_THE_KEY, **values})


# the values of keys whose default changed, for configs saved before the key existed: FP8 runs
# before model.fp8_backward_groups took the embedding's and decoder's gradients in bf16
SAVED_BEFORE_THE_KEY: dict[str, Any] = {"fp8_backward_groups": ()}


# the groups of linear layers that model.bayesian, model.fp8_groups and model.fp8_backward_groups
# name: "all" is every one
LAYER_GROUPS = ("all", "embedding", "token_mixing", "channel_mixing", "last_block", "decoder")
FP8_RECIPES = ("none", "tensorwise", "delayed")  # parallel.fp8.RECIPES


def _layer_groups(value, key: str) -> tuple[str, ...]:
    """``model.<key>`` as a tuple of group names: a name, a list of names, or none."""
    names = [value] if isinstance(value, str) else list(value or ())
    names = [name for name in names if name != "none"]
    unknown = [name for name in names if name not in LAYER_GROUPS]
    if unknown:
        raise ConfigError(f"model.{key} = {value!r}: unknown layer groups {unknown}; expected 'none' or some of "
                          f"{list(LAYER_GROUPS)}")
    return tuple(dict.fromkeys(names))


def _check_keys(values: dict[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {names}")


# ERA5 at 0.25 deg as in the paper: 4 surface + 5 upper-air variables x 13 levels = 69
# channels, 3 static fields, no time features; 721 rows cropped to 720; 1-D patches of 60
# longitudes -> 720 x 24 = 17,280 tokens of 60 x 72 values; 3 blocks; dropout as in its runs.
_ERA5_025 = dict(lat=721, lon=1440, lat_multiple=2, in_channels=69, out_channels=69, static_channels=3,
                 forcing_channels=0, patch=(1, 60), depth=3, channel_fraction=1.0, dropout=0.001)

PRESETS: dict[str, ModelConfig] = {
    # test and demo sizes (channel counts and grid are defaults; the trainer takes the store's)
    "tiny": ModelConfig(lat=9, lon=16, in_channels=3, out_channels=3, static_channels=1, forcing_channels=2,
                        patch=(1, 4), hidden=8, depth=2, token_fraction=0.5),
    "demo": ModelConfig(lat=33, lon=64, in_channels=8, out_channels=8, static_channels=2, forcing_channels=4,
                        patch=(1, 4), hidden=128, depth=3, token_fraction=0.5),
    # the paper's sizes (its figures: 1,062.4M / 1,404.9M / 2,569.4M parameters; see counts.py)
    "jigsaw-1b": ModelConfig(**_ERA5_025, hidden=4320, token_fraction=0.5),
    "jigsaw-1.4b": ModelConfig(**_ERA5_025, hidden=8192, token_fraction=0.5),
    "jigsaw-2.6b": ModelConfig(**_ERA5_025, hidden=10352, token_fraction=1.0),
    # "up to 3.2B" in the paper, configuration not published: full token MLP, hidden 14 x 1024
    "jigsaw-3.2b": ModelConfig(**_ERA5_025, hidden=14336, token_fraction=1.0),
    # 0.125 deg (1441 x 2880 -> 1440 x 2880): 2 x 120 patches keep the 17,280 tokens and the
    # mixer of jigsaw-1b; embedding and recovery grow 4x (our choice; the paper gives no sizes)
    "jigsaw-1b-0.125deg": ModelConfig(**{**_ERA5_025, "lat": 1441, "lon": 2880, "lat_multiple": 1,
                                         "patch": (2, 120)}, hidden=4320, token_fraction=0.5),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with field overrides (unknown fields are refused by name)."""
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} unknown; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
