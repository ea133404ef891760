"""Reanalysis netCDF files as other centres write them, built inside the tests.

:func:`unusual_file` writes one file whose every convention differs from the ERA5 download
of ``data.synthetic``: axes named ``t``/``y``/``x``/``p`` and recognised only by their CF
attributes, latitude descending, longitude in -180..180, pressure in Pa, time in days
since 1950 and variables the ERA5 vocabulary lacks. :func:`expected_field` gives what the
store must hold for a variable: the source values, latitude ascending and longitude
rolled to 0..360.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

GRID = (9, 16)
LEVELS_PA = (50000.0, 85000.0)
SURFACE = {"sst": ("Sea surface temperature", "K", 290.0, 5.0), "tp": ("Total precipitation", "m", 0.002, 0.001),
           "d2m": ("2 metre dewpoint temperature", "K", 280.0, 8.0)}
UPPER_AIR = {"w": ("Vertical velocity", "Pa s**-1", 0.0, 0.3), "r": ("Relative humidity", "%", 60.0, 15.0)}
STATIC = {"lsm": ("Land-sea mask", "(0 - 1)", 0.3, 0.4)}


def times(n_times: int, start: str = "2020-01-01", hours: int = 6) -> np.ndarray:
    return pd.date_range(start, periods=n_times, freq=f"{hours}h").values.astype("datetime64[ns]")


def coordinates(n_times: int, *, start: str = "2020-01-01", longitude_start: float = -180.0) -> dict:
    """CF coordinates under names no list knows: only their attributes say what they are."""
    latitude = np.linspace(80.0, -80.0, GRID[0])  # north to south
    longitude = longitude_start + np.arange(GRID[1]) * (360.0 / GRID[1])
    days = (times(n_times, start) - np.datetime64("1950-01-01", "ns")) / np.timedelta64(1, "D")
    return {
        "t": ("t", days, {"axis": "T", "units": "days since 1950-01-01 00:00:00", "calendar": "standard"}),
        "p": ("p", np.asarray(LEVELS_PA), {"units": "Pa", "positive": "down", "axis": "Z"}),
        "y": ("y", latitude, {"standard_name": "latitude", "units": "degrees_north"}),
        "x": ("x", longitude, {"axis": "X", "units": "degrees_east"}),
    }


def _field(rng: np.random.Generator, shape: tuple[int, ...], mean: float, spread: float) -> np.ndarray:
    return (mean + spread * rng.standard_normal(shape)).astype(np.float32)


def unusual_dataset(n_times: int = 48, *, seed: int = 0, start: str = "2020-01-01",
                    longitude_start: float = -180.0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    variables = {}
    for name, (long_name, units, mean, spread) in SURFACE.items():
        variables[name] = (("t", "y", "x"), _field(rng, (n_times, *GRID), mean, spread),
                           {"long_name": long_name, "units": units})
    for name, (long_name, units, mean, spread) in UPPER_AIR.items():
        variables[name] = (("t", "p", "y", "x"), _field(rng, (n_times, len(LEVELS_PA), *GRID), mean, spread),
                           {"long_name": long_name, "units": units})
    for name, (long_name, units, mean, spread) in STATIC.items():
        variables[name] = (("y", "x"), _field(rng, GRID, mean, spread), {"long_name": long_name, "units": units})
    days = coordinates(n_times, start=start)["t"][1]
    variables["t_bnds"] = (("t", "nv"), np.stack([days, days + 0.25], axis=1), {})
    return xr.Dataset(variables, coords=coordinates(n_times, start=start, longitude_start=longitude_start))


def unusual_file(path: Path, n_times: int = 48, **options) -> Path:
    unusual_dataset(n_times, **options).to_netcdf(path)
    return path


def expected_field(dataset: xr.Dataset, name: str) -> np.ndarray:
    """The values a store holds for ``name``: latitude ascending, longitude in [0, 360) ascending."""
    rows = np.argsort(dataset["y"].values)
    columns = np.argsort(np.mod(dataset["x"].values, 360.0))
    return dataset[name].values[..., rows, :][..., columns]
