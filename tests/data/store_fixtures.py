"""Tiny stores that follow the contract of ``data/schema.py``, and a recorder of store reads.

The stores are written the way the contract describes (xarray, zarr v3, no consolidated
metadata, chunks ``time=1, level=1`` and one spatial chunk per tile, root attributes from
``StoreAttrs``), independently of the preprocessor, so reader tests pin the contract
rather than one writer's behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr.storage

from data.schema import STATIC, SURFACE, UPPER_AIR
from data.synthetic import write_fields_store


def write_store(path: Path, *, n_times: int = 4, n_lat: int = 8, n_lon: int = 12,
                levels: Sequence[int] = (500, 850, 1000), surface: Sequence[str] = ("msl", "t2m"),
                upper_air: Sequence[str] = ("z", "t"), static: Sequence[str] = ("lsm", "orography"),
                tile_grid: tuple[int, int] = (2, 2), spatial_chunks: tuple[int, int] | None = None,
                compressed: bool = True, complete: bool = True, time_step_hours: int = 6,
                times: Sequence[np.datetime64] | None = None, seed: int = 0) -> Path:
    """Write a store of random fields with per-channel offsets and scales; returns ``path``.

    Spatial chunks default to one tile of ``tile_grid`` (``ceil(n / tiles)`` points).
    ``times`` overrides the regular axis (e.g. to leave a gap). ``compressed=False``
    stores chunks raw, so a chunk file holds exactly its ``4 * elements`` bytes.
    """
    rng = np.random.default_rng(seed)
    if times is None:
        times = pd.date_range("2020-01-01", periods=n_times, freq=f"{time_step_hours}h")
    times = np.asarray(times, dtype="datetime64[ns]")
    n_times = len(times)
    latitudes = np.linspace(-90.0, 90.0, n_lat)
    longitudes = np.arange(n_lon) * (360.0 / n_lon)
    if spatial_chunks is None:
        spatial_chunks = (math.ceil(n_lat / tile_grid[0]), math.ceil(n_lon / tile_grid[1]))

    def field(*shape: int) -> np.ndarray:
        offset, scale = rng.uniform(-1000, 1000), rng.uniform(0.5, 50)
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    data_vars = {}
    for name in surface:
        data_vars[name] = (("time", "latitude", "longitude"), field(n_times, n_lat, n_lon),
                           {"long_name": SURFACE[name][0], "units": SURFACE[name][1]})
    for name in upper_air:
        values = np.stack([field(n_times, n_lat, n_lon) for _ in levels], axis=1)
        data_vars[name] = (("time", "level", "latitude", "longitude"), values,
                           {"long_name": UPPER_AIR[name][0], "units": UPPER_AIR[name][1]})
    for name in static:
        data_vars[name] = (("latitude", "longitude"), field(n_lat, n_lon),
                           {"long_name": STATIC[name][0], "units": STATIC[name][1]})
    dataset = xr.Dataset(data_vars, coords={
        "time": times, "level": np.asarray(levels, dtype=np.int64),
        "latitude": ("latitude", latitudes, {"units": "degrees_north"}),
        "longitude": ("longitude", longitudes, {"units": "degrees_east"})})

    return write_fields_store(path, dataset, list(static), spatial_chunks=spatial_chunks, tile_grid=tile_grid,
                              compressed=compressed, complete=complete, time_step_hours=time_step_hours)


def chunk_keys(variable: str, rows: tuple[int, int], columns: tuple[int, int], spatial_chunks: tuple[int, int],
               time_indices: Sequence[int] | None = None, level_indices: Sequence[int] | None = None) -> set[str]:
    """Keys (zarr v3 default encoding ``c/...``) of the chunks covering a selection.

    Chunks of one time step and one level; leave ``time_indices`` out for static variables
    and ``level_indices`` for surface ones.
    """
    leading = [[]]
    for indices in (time_indices, level_indices):
        if indices is not None:
            leading = [lead + [i] for lead in leading for i in indices]
    lat_chunks = range(rows[0] // spatial_chunks[0], math.ceil(rows[1] / spatial_chunks[0]))
    lon_chunks = range(columns[0] // spatial_chunks[1], math.ceil(columns[1] / spatial_chunks[1]))
    return {"/".join([variable, "c", *map(str, lead), str(i), str(j)])
            for lead in leading for i in lat_chunks for j in lon_chunks}


class ReadRecorder:
    """Records every key (and its byte count) read through ``zarr.storage.LocalStore``.

    Patches the store class itself, so reads made through any instance - including the
    ones zarr creates inside an open group - are seen.
    """

    def __init__(self) -> None:
        self.reads: list[tuple[str, int]] = []

    def __enter__(self) -> "ReadRecorder":
        self._get = zarr.storage.LocalStore.get
        self._get_partial = zarr.storage.LocalStore.get_partial_values
        original_get, original_partial, reads = self._get, self._get_partial, self.reads

        async def get(store, key, prototype=None, byte_range=None):
            buffer = await original_get(store, key, prototype, byte_range)
            if buffer is not None:
                reads.append((key, len(buffer)))
            return buffer

        async def get_partial_values(store, prototype, key_ranges):
            key_ranges = list(key_ranges)
            buffers = await original_partial(store, prototype, key_ranges)
            reads.extend((key, len(b)) for (key, _), b in zip(key_ranges, buffers) if b is not None)
            return buffers

        zarr.storage.LocalStore.get = get
        zarr.storage.LocalStore.get_partial_values = get_partial_values
        return self

    def __exit__(self, *exc_info) -> None:
        zarr.storage.LocalStore.get = self._get
        zarr.storage.LocalStore.get_partial_values = self._get_partial

    def clear(self) -> None:
        self.reads.clear()

    @property
    def keys(self) -> set[str]:
        return {key for key, _ in self.reads}

    @property
    def n_bytes(self) -> int:
        return sum(n for _, n in self.reads)
