"""The preprocessing config (``configs/data/*.yaml``): what a store holds and how it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from data.combine import Selection
from data.missing_values import NanPolicy


class DataConfigError(ValueError):
    """A preprocessing config that cannot work; the message names the file or key."""


class DataConfig(BaseModel):
    """``configs/data/*.yaml``: what the store holds and how it is written."""

    model_config = ConfigDict(extra="forbid")

    # None: every candidate the inputs offer (data.vocabulary); a list narrows the group
    variables: list[str] | None = None  # narrows every group
    surface: list[str] | None = None
    upper_air: list[str] | None = None
    static: list[str] | None = None
    levels: list[int] | None = None
    start: str | None = None  # first time (ISO date or date-time), default the inputs' first
    end: str | None = None  # last time, inclusive; a bare date means its last time step
    time_step_hours: int | None = None  # default the inputs' step; a multiple of it subsamples
    statistics_period: tuple[str, str] | None = None  # first and last day, inclusive
    tile_grid: tuple[int, int] = (1, 1)
    member: int | Literal["all"] | None = None  # 'all': keep the member dimension (--members all)
    on_nan: str | dict[str, str] = "fail"  # data.missing_values: 'fill', 'sst=mask,fail' or {sst: mask}
    batch_size: int | None = None

    @field_validator("on_nan")
    @classmethod
    def _policy(cls, spec):
        NanPolicy.parse(spec)  # raises NanPolicyError (a ValueError) naming the part at fault
        return spec

    def selection(self) -> Selection:
        end = self.end
        if end is not None and len(end) <= 10:  # a date: include all of its time steps
            end = str(np.datetime64(end, "D") + np.timedelta64(1, "D") - np.timedelta64(1, "ns"))
        return Selection(surface=self.surface, upper_air=self.upper_air, static=self.static, levels=self.levels,
                         start=None if self.start is None else np.datetime64(self.start, "ns"),
                         end=None if end is None else np.datetime64(end, "ns"),
                         time_step_hours=self.time_step_hours, variables=self.variables)


def load_data_config(path: Path | None, overrides: dict) -> DataConfig:
    """The YAML at ``path`` (optional) with ``overrides`` (None values ignored), validated; raises
    :class:`DataConfigError` naming the file or key."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise DataConfigError(f"--config {path}: {error}") from None
        if not isinstance(values, dict):
            raise DataConfigError(f"--config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return DataConfig(**values)
    except ValidationError as error:
        problems = "; ".join(f"key {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise DataConfigError(f"{'--config ' + str(path) if path else 'options'}: {problems}") from None
