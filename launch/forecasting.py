"""Forecasts from a consolidated checkpoint on any mesh, written in the WeatherBench2 layout.

Every rank of a model replica (domain x tensor) reads only its tile and channel slice of
the initial state (:class:`launch.tiles.RankInputs`), rolls the model out autoregressively
with the time features of each step's input time, de-normalises with the checkpoint's
statistics and writes its own region of one zarr store. Replicas (the data axis) share
the initialisation times out between them.

Store layout (WeatherBench2): dims ``time`` (initialisation), ``prediction_timedelta``
(lead, 0 = the initial state), ``level`` (hPa, ascending), ``latitude`` (ascending, the
model grid's rows that exist in the data store), ``longitude``; upper-air variables
``(time, prediction_timedelta, level, latitude, longitude)``, surface ones without
``level``, named as in WeatherBench2 (``geopotential``, ``2m_temperature``, ...) with the
data store's units and long names.

Chunks are ``time=1, prediction_timedelta=all, level=1`` and spatial chunks that divide
every rank's tile, so ranks write disjoint chunk files and never the same one. Rank 0
writes the skeleton (coordinates and empty arrays, NaN where nothing is written yet) under
a temporary name; every rank writes its region; rank 0 marks the store complete and
renames it into place. A store without ``complete = True`` is a run that did not finish.
"""

from __future__ import annotations

import math
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
import zarr
from tqdm import tqdm

from data.schema import SURFACE, UPPER_AIR, Channel, StoreError
from launch.checkpoint import CheckpointError, load_consolidated
from launch.tiles import RankInputs, check_store_matches, store_attrs
from parallel.mesh import MeshConfig, ProcessMesh
from parallel.sharding import load_full_state
from weathermixer.model import WeatherMixer

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

    @property
    def targets(self) -> list[ChannelTarget]:
        level_index = {level: i for i, level in enumerate(self.levels)}
        return [ChannelTarget(wb2_name(c.variable), None if c.level is None else level_index[c.level])
                for c in self.channels]

    @property
    def variables(self) -> dict[str, bool]:
        """WB2 variable name -> has a level axis, in channel order."""
        return {wb2_name(c.variable): c.level is not None for c in self.channels}


def spatial_chunks(bounds: list[tuple[int, int]], size: int) -> int:
    """The largest chunk length that puts every tile boundary (clipped to ``size``) on a chunk edge."""
    edges = {min(edge, size) for pair in bounds for edge in pair} - {0}
    return math.gcd(*edges) if edges else size


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
    n_time, n_lead = len(init_times), len(leads)
    n_lat, n_lon = len(layout.latitudes), len(layout.longitudes)
    data_vars, encoding = {}, {}
    lat_chunk, lon_chunk = layout.spatial_chunks
    for name, upper_air in layout.variables.items():
        if upper_air:
            dims = ("time", "prediction_timedelta", "level", "latitude", "longitude")
            shape, chunks = (n_time, n_lead, len(layout.levels), n_lat, n_lon), (1, n_lead, 1, lat_chunk, lon_chunk)
        else:
            dims = ("time", "prediction_timedelta", "latitude", "longitude")
            shape, chunks = (n_time, n_lead, n_lat, n_lon), (1, n_lead, lat_chunk, lon_chunk)
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
    dataset = xr.Dataset(data_vars, coords=coords, attrs={**attrs, "complete": False})
    dataset.to_zarr(path, mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding)


def write_region(path: Path, layout: ForecastLayout, values: np.ndarray, times: slice, rows: slice,
                 columns: slice, channel_indices: list[int]) -> None:
    """Write ``values`` ``(time, lead, rows, columns, local channels)`` for the given channels.

    Channels are the rank's slice of the model channel list; those of one variable are
    written with one orthogonal selection over their levels.
    """
    group = zarr.open_group(path, mode="r+")
    targets = layout.targets
    by_variable: dict[str, list[tuple[int | None, int]]] = {}
    for position, index in enumerate(channel_indices):
        target = targets[index]
        by_variable.setdefault(target.variable, []).append((target.level_index, position))
    for name, members in by_variable.items():
        positions = [p for _, p in members]
        if members[0][0] is None:
            group[name].set_orthogonal_selection((times, slice(None), rows, columns),
                                                 values[..., positions[0]])
        else:
            block = np.moveaxis(values[..., positions], -1, 2)  # (time, lead, level, rows, columns)
            levels = np.asarray([level for level, _ in members])
            group[name].set_orthogonal_selection((times, slice(None), levels, rows, columns), block)


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


# ---------------------------------------------------------------------- init times
# minutes are optional and matched lazily, so "…T00:12" reads as hour 00 then EVERY_HOURS 12
DATETIME_PATTERN = r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::\d{2})??)?"
_INIT_SPEC = re.compile(rf"^({DATETIME_PATTERN})(?::({DATETIME_PATTERN}))?(?::(\d+))?$")


def parse_init_times(spec: str, store_times: np.ndarray, step_hours: int, store: str) -> np.ndarray:
    """``START[:END[:EVERY_HOURS]]`` (ISO times, END inclusive, EVERY default the store step)
    as the initialisation times, each of which must be on the store's time axis."""
    match = _INIT_SPEC.match(spec.strip())
    if not match:
        raise ForecastError(f"--init {spec!r}: expected START[:END[:EVERY_HOURS]] with ISO times, e.g. "
                            f"2020-01-01T00:2020-01-31T12:12")
    start = np.datetime64(match.group(1).replace(" ", "T"), "ns")
    end = np.datetime64(match.group(2).replace(" ", "T"), "ns") if match.group(2) else start
    every = int(match.group(3)) if match.group(3) else step_hours
    if end < start or every < 1:
        raise ForecastError(f"--init {spec!r}: expected END >= START and EVERY_HOURS >= 1")
    times = np.arange(start, end + np.timedelta64(1, "ns"), np.timedelta64(every, "h")).astype("datetime64[ns]")
    missing = times[~np.isin(times, store_times)]
    if missing.size:
        raise ForecastError(f"--init {spec!r}: init times {[str(t)[:16] for t in missing[:4]]}"
                            f"{' ...' if missing.size > 4 else ''} are not on the time axis of {store} "
                            f"({str(store_times[0])[:16]} .. {str(store_times[-1])[:16]} every {step_hours} h); "
                            f"expected init times inside the store")
    return times


# ---------------------------------------------------------------------- the run
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


WORLD = "world"


@contextmanager
def _on_every_rank(what: str, group=WORLD):
    """Run the block, then raise on every rank of ``group`` if it failed on any of them.

    A rank that failed alone would otherwise leave the others waiting for it in the next
    collective. ``group``: :data:`WORLD`, a process group, or None (this rank alone).
    """
    error = None
    try:
        yield
    except Exception as failure:
        error = failure
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [message]
    if dist.is_initialized() and group is not None:
        group = None if group == WORLD else group
        messages = [None] * dist.get_world_size(group)
        dist.all_gather_object(messages, message, group=group)
    if error is not None:
        raise error
    failed = [text for text in messages if text]
    if failed:
        raise ForecastError(f"{what} failed on another rank: {failed[0]}")


def _check_checkpoint(metadata: dict, checkpoint: str) -> None:
    missing = [k for k in ("channels", "static_channels", "time_step_hours", "normalization") if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint}: metadata keys {missing} missing; expected a checkpoint "
                              f"written by launch/train.py")
    stats = metadata["normalization"]
    for key in ("mean", "std"):
        if len(stats.get(key, [])) != len(metadata["channels"]):
            raise CheckpointError(f"checkpoint {checkpoint}: metadata normalization.{key} has "
                                  f"{len(stats.get(key, []))} values, expected one per channel "
                                  f"({len(metadata['channels'])})")


def run_forecast(checkpoint: str | Path, store: str | Path, output: str | Path, init: str, steps: int, *,
                 domain: tuple[int, int] = (1, 1), tensor: int = 1, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 1, overwrite: bool = False,
                 progress: bool = True, compile: bool = False) -> Path:
    """Forecast ``steps`` steps from every init time of ``init``; every rank calls this.

    Runs on the mesh ``domain x tensor`` (data = whatever the world size leaves; replicas
    share the init times out). ``compile``: the model step through ``torch.compile`` (the
    first init time pays the compilation, later ones run ~2x faster on a GPU). Returns the
    path of the complete forecast store.
    """
    checkpoint, store, output = str(checkpoint), str(store), Path(output)
    if steps < 1 or batch_size < 1:
        raise ForecastError(f"--steps {steps} / --batch-size {batch_size}: expected positive integers")
    if output.exists() and not overwrite:
        raise ForecastError(f"--output {output} exists; pass --overwrite to replace it")
    consolidated = load_consolidated(checkpoint)
    metadata, config = consolidated.metadata, consolidated.model_config
    _check_checkpoint(metadata, checkpoint)
    attrs = check_store_matches(metadata, store)
    if not attrs.complete:
        raise StoreError(f"{store}: store is incomplete (root attribute 'complete' is not true): the "
                         f"preprocessing run that wrote it did not finish")
    _, n_lat, n_lon = store_attrs(store)
    if (config.lat, config.lon) != (n_lat, n_lon):
        raise ForecastError(f"checkpoint {checkpoint} was trained on a {config.lat}x{config.lon} grid, {store} "
                            f"has {n_lat}x{n_lon} (latitude x longitude); expected the same grid")
    step_hours = int(metadata["time_step_hours"])
    if step_hours != attrs.time_step_hours:
        raise ForecastError(f"checkpoint {checkpoint} steps {step_hours} h, {store} has time_step_hours "
                            f"{attrs.time_step_hours}; expected the same step")

    device = torch.device(device)
    mesh = ProcessMesh.build(MeshConfig(domain=tuple(domain), tensor=tensor), device_type=device.type)
    model = WeatherMixer(config, mesh)
    load_full_state(model, consolidated.state_dict)
    model.to(device=device, dtype=dtype).eval()
    if compile:
        model.compile_step()
    inputs = RankInputs(store, model)
    times = parse_init_times(init, inputs.reader.times, step_hours, store)
    step = np.timedelta64(step_hours, "h")
    leads = np.arange(steps + 1) * step

    # the rank's channels: store statistics (the reader's) -> the checkpoint's (the model's)
    channels = model.state_channels.indices[mesh.tensor_rank].tolist()
    store_mean, store_std = (np.asarray(attrs.mean)[channels], np.asarray(attrs.std)[channels])
    mean = np.asarray(metadata["normalization"]["mean"], dtype=np.float64)[channels]
    std = np.asarray(metadata["normalization"]["std"], dtype=np.float64)[channels]
    renormalise = not (np.array_equal(mean, store_mean) and np.array_equal(std, store_std))

    # output grid: the model grid's rows that exist in the store (crop drops rows, padding adds none)
    n_rows = min(config.model_lat, n_lat)
    tiling = model.layers.tiling
    bounds = [tiling.tile_bounds(tile) for tile in range(tiling.n_tiles)]
    layout = ForecastLayout(
        channels=attrs.channels, levels=sorted({c.level for c in attrs.channels if c.level is not None}),
        latitudes=np.asarray(zarr.open_group(store, mode="r")["latitude"][:n_rows], dtype=np.float64),
        longitudes=np.asarray(zarr.open_group(store, mode="r")["longitude"][:], dtype=np.float64),
        spatial_chunks=(spatial_chunks([b[0] for b in bounds], n_rows), spatial_chunks([b[1] for b in bounds], n_lon)),
        attributes=variable_attributes(store, attrs.channels))

    partial = partial_path(output)
    with _on_every_rank(f"creating the forecast store {partial}"):
        if _rank() == 0:
            create_skeleton(partial, layout, times, leads, {
                "title": "WeatherMixer forecast", "checkpoint": checkpoint, "checkpoint_step": metadata.get("step"),
                "store": store, "init": init, "steps": steps, "time_step_hours": step_hours,
                "channels": [c.to_json() for c in attrs.channels], "mesh": mesh.describe(), "dtype": str(dtype),
                "model_config": config.to_dict()})

    (lat0, lat1), (lon0, lon1) = model.layers.tile_bounds()
    rows = slice(min(lat0, n_rows), min(lat1, n_rows))
    mine = np.array_split(np.arange(len(times)), mesh.replicas)[mesh.replica_rank]
    time_index = {t: i for i, t in enumerate(inputs.reader.times)}
    bar = tqdm(total=len(times), desc="forecast", unit="init", disable=not (progress and _rank() == 0))
    # failures are agreed on within the model group around its collectives (the rollout), and
    # over all ranks at the end (replicas may have different numbers of batches)
    model_group = mesh.model_group
    with _on_every_rank(f"writing the forecast into {partial}"), bar:
        for first in range(0, len(mine), batch_size):
            batch = mine[first:first + batch_size]
            with _on_every_rank("reading the initial states", model_group):
                samples = [inputs.reader.sample(time_index[times[i]], lead_steps=0) for i in batch]
                state, static, _, _ = inputs.batch(samples, device, dtype)
                if renormalise:
                    scale = torch.as_tensor(store_std / std, device=device, dtype=torch.float64)
                    shift = torch.as_tensor((store_mean - mean) / std, device=device, dtype=torch.float64)
                    state = (state.double() * scale + shift).to(dtype)
                forcings = torch.stack([inputs.forcings(times[i] + np.arange(steps) * step) for i in batch])
            with torch.no_grad():
                forecast = model.rollout(state, static, forcings.to(device, dtype), steps)
            with _on_every_rank(f"writing the forecast into {partial}", model_group):
                if rows.stop > rows.start:  # a tile of padding rows only has nothing to write
                    states = torch.cat([state[:, None], forecast], dim=1)[:, :, :rows.stop - lat0]
                    values = (states.double().cpu().numpy() * std + mean).astype(np.float32)
                    write_region(partial, layout, values, slice(int(batch[0]), int(batch[-1]) + 1), rows,
                                 slice(lon0, lon1), channels)
            bar.update(len(batch) * mesh.replicas)
    with _on_every_rank(f"completing the forecast store {output}"):
        if _rank() == 0:
            mark_complete(partial, output, overwrite)
    return output
