"""The forecast store: WeatherBench2's layout, written region by region, marked complete at the end.

Dims ``time`` (initialisation), ``prediction_timedelta`` (lead, 0 = the initial state),
``realization`` (ensemble member; only in an ensemble forecast, WeatherBench2's default name
for the ensemble dimension), ``level`` (hPa, ascending), ``latitude`` (ascending),
``longitude``; upper-air variables ``(time, prediction_timedelta, [realization,] level,
latitude, longitude)``, surface ones without ``level``, named as in WeatherBench2
(``geopotential``, ``2m_temperature``, ...) with the data store's units and long names.

Chunks are ``time=1, prediction_timedelta=all, realization=1, level=1`` and spatial chunks
that divide every rank's tile (:func:`parallel.tiling.chunk_length`), so ranks write disjoint
chunk files. The skeleton (coordinates, empty arrays) is written under a temporary name
(:func:`partial_path`); every rank writes its regions (:func:`write_region`) and
:class:`Progress` records each finished (init time, member) pair, so a rerun of the same
request continues where the last one stopped; :func:`mark_complete` sets ``complete = True``
and renames the store into place. A store without ``complete = True`` did not finish.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import xarray as xr
import zarr

from data.schema import SURFACE, UPPER_AIR, Channel

# canonical short name -> WeatherBench2 variable name
WB2_NAMES = {
    "z": "geopotential", "t": "temperature", "u": "u_component_of_wind", "v": "v_component_of_wind",
    "q": "specific_humidity", "msl": "mean_sea_level_pressure", "t2m": "2m_temperature",
    "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
}
SHORT_NAMES = {wb2: short for short, wb2 in WB2_NAMES.items()}
KEPT_ATTRIBUTES = ("long_name", "units", "standard_name")


class ForecastError(ValueError):
    """A forecast request or forecast store that cannot work; the message says what was expected."""


def wb2_name(variable: str) -> str:
    """The WeatherBench2 name of a store variable (unknown variables keep their own name)."""
    return WB2_NAMES.get(variable, variable)


@dataclass(frozen=True)
class ChannelTarget:
    """Where one model channel lands in the forecast store."""

    variable: str  # WeatherBench2 name
    level_index: int | None  # index on the ``level`` coordinate; None for surface variables


@dataclass(frozen=True)
class ForecastLayout:
    channels: list[Channel]
    levels: list[int]
    latitudes: np.ndarray
    longitudes: np.ndarray
    spatial_chunks: tuple[int, int]
    attributes: dict[str, dict[str, Any]]  # WB2 variable name -> units, long name, short name
    members: int | None = None  # ensemble members (a ``realization`` dim); None: one deterministic forecast

    @property
    def targets(self) -> list[ChannelTarget]:
        level_index = {level: i for i, level in enumerate(self.levels)}
        return [ChannelTarget(wb2_name(c.variable), None if c.level is None else level_index[c.level])
                for c in self.channels]

    @property
    def variables(self) -> dict[str, bool]:
        """WB2 variable name -> has a level axis, in channel order."""
        return {wb2_name(c.variable): c.level is not None for c in self.channels}


def variable_attributes(store: str, channels: list[Channel]) -> dict[str, dict[str, Any]]:
    """Units and long names of the store's variables (schema defaults where the store has none)."""
    group = zarr.open_group(store, mode="r")
    out = {}
    for channel in channels:
        name = wb2_name(channel.variable)
        if name in out:
            continue
        long_name, units = {**SURFACE, **UPPER_AIR}.get(channel.variable, (channel.variable, ""))
        stored = dict(group[channel.variable].attrs) if channel.variable in group else {}
        attrs = {"long_name": long_name, "units": units}
        attrs.update({k: stored[k] for k in KEPT_ATTRIBUTES if k in stored})
        attrs["short_name"] = channel.variable
        out[name] = attrs
    return out


def partial_path(output: Path) -> Path:
    """The name the store is written under until it is complete."""
    return output.with_name(f".{output.name}.partial")


def create_skeleton(path: Path, layout: ForecastLayout, init_times: np.ndarray, leads: np.ndarray,
                    attrs: dict[str, Any]) -> None:
    """Coordinates, empty (NaN) arrays and root attributes, with ``complete = False``."""
    if path.exists():
        shutil.rmtree(path)  # a partial store of an earlier run that stopped
    ensemble = () if layout.members is None else ("realization",)
    sizes = {"time": len(init_times), "prediction_timedelta": len(leads), "realization": layout.members,
             "level": len(layout.levels), "latitude": len(layout.latitudes), "longitude": len(layout.longitudes)}
    chunk_of = {"time": 1, "prediction_timedelta": len(leads), "realization": 1, "level": 1,
                "latitude": layout.spatial_chunks[0], "longitude": layout.spatial_chunks[1]}
    data_vars, encoding = {}, {}
    for name, upper_air in layout.variables.items():
        dims = ("time", "prediction_timedelta", *ensemble, *(("level",) if upper_air else ()), "latitude",
                "longitude")
        shape, chunks = tuple(sizes[d] for d in dims), tuple(chunk_of[d] for d in dims)
        data_vars[name] = (dims, dask.array.zeros(shape, chunks=chunks, dtype=np.float32), layout.attributes[name])
        encoding[name] = {"chunks": chunks}
    coords = {
        "time": ("time", np.asarray(init_times, dtype="datetime64[ns]"), {"long_name": "initialisation time"}),
        "prediction_timedelta": ("prediction_timedelta", np.asarray(leads, dtype="timedelta64[ns]"),
                                 {"long_name": "lead time"}),
        "latitude": ("latitude", layout.latitudes, {"units": "degrees_north", "long_name": "latitude"}),
        "longitude": ("longitude", layout.longitudes, {"units": "degrees_east", "long_name": "longitude"}),
    }
    if layout.levels:
        coords["level"] = ("level", np.asarray(layout.levels, dtype=np.int64),
                           {"units": "hPa", "long_name": "pressure level"})
    if ensemble:
        coords["realization"] = ("realization", np.arange(layout.members, dtype=np.int64),
                                 {"long_name": "ensemble member",
                                  "description": "WeatherBench2's default name of the ensemble dimension"})
        attrs = {**attrs, "ensemble_dim": "realization"}
    dataset = xr.Dataset(data_vars, coords=coords, attrs={**attrs, "complete": False})
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding)


def write_region(path: Path, layout: ForecastLayout, values: np.ndarray, times: np.ndarray, rows: slice,
                 columns: slice, channel_indices: list[int], member: int | None = None) -> None:
    """Write ``values`` ``(time, lead, rows, columns, local channels)`` at init-time indices
    ``times`` (and ensemble member ``member``) for the given channels.

    Channels are the rank's slice of the model channel list; those of one variable are
    written with one orthogonal selection over their levels.
    """
    group = zarr.open_group(path, mode="r+")
    targets = layout.targets
    times = np.asarray(times, dtype=np.int64)
    ensemble = () if member is None else (member,)
    by_variable: dict[str, list[tuple[int | None, int]]] = {}
    for position, index in enumerate(channel_indices):
        target = targets[index]
        by_variable.setdefault(target.variable, []).append((target.level_index, position))
    for name, members in by_variable.items():
        positions = [p for _, p in members]
        if members[0][0] is None:
            group[name].set_orthogonal_selection((times, slice(None), *ensemble, rows, columns),
                                                 values[..., positions[0]])
        else:
            block = np.moveaxis(values[..., positions], -1, 2)  # (time, lead, level, rows, columns)
            levels = np.asarray([level for level, _ in members])
            group[name].set_orthogonal_selection((times, slice(None), *ensemble, levels, rows, columns), block)


class Progress:
    """Which (init time, member) pairs of a partial store are written: one empty marker file per
    pair in a folder beside the store, made once every rank of the model replica has written
    its region of the pair. ``member`` None: a deterministic forecast."""

    def __init__(self, output: Path):
        self.folder = output.with_name(f".{output.name}.progress")

    @staticmethod
    def _name(time_index: int, member: int | None) -> str:
        return f"{time_index}-{'mean' if member is None else member}"

    def reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def done(self) -> set[str]:
        return {p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set()

    def pending(self, time_indices, member: int | None, done: set[str]) -> list[int]:
        return [int(i) for i in time_indices if self._name(int(i), member) not in done]

    def mark(self, time_indices, member: int | None) -> None:
        for i in time_indices:
            (self.folder / self._name(int(i), member)).touch()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def resumable(partial: Path, request: dict[str, Any]) -> bool:
    """Whether ``partial`` is the store of an earlier run of the same ``request`` (JSON values)."""
    try:
        return zarr.open_group(partial, mode="r").attrs.get("request") == request
    except Exception:  # absent or unreadable: start afresh
        return False


def mark_complete(partial: Path, output: Path, overwrite: bool) -> None:
    """Set ``complete = True`` and move the store to its final name."""
    group = zarr.open_group(partial, mode="r+")
    group.attrs["complete"] = True
    if output.exists():
        if not overwrite:
            raise ForecastError(f"--output {output} exists; pass --overwrite to replace it")
        shutil.rmtree(output)
    partial.rename(output)


def open_forecast(path: str | Path) -> xr.Dataset:
    """A complete forecast store, lazily (refuses one whose writing did not finish)."""
    path = Path(path)
    if not path.exists():
        raise ForecastError(f"forecast {path} does not exist")
    try:
        dataset = xr.open_zarr(path, consolidated=False, decode_timedelta=True, chunks=None)
    except Exception as error:
        raise ForecastError(f"forecast {path} cannot be opened as a zarr store ({type(error).__name__}: "
                            f"{error})") from None
    if dataset.attrs.get("complete") is not True:
        raise ForecastError(f"forecast {path} is incomplete (root attribute 'complete' is not true): the forecast "
                            f"run that wrote it did not finish")
    missing = [d for d in ("time", "prediction_timedelta", "latitude", "longitude") if d not in dataset.dims]
    if missing:
        raise ForecastError(f"forecast {path}: dims {missing} missing; expected the WeatherBench2 layout "
                            f"(time, prediction_timedelta, [level,] latitude, longitude)")
    return dataset
