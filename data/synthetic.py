"""Synthetic ERA5-like netCDF files, laid out like a Copernicus Climate Data Store download.

Why: the preprocess -> train -> forecast chain needs input files that look like real ERA5
downloads and whose evolution a small model can learn, so that tests and a demo run show
skill over persistence without any reanalysis data.

Files, as the CDS wrote netCDF before its 2024 format change (one per month, or per year):

* ``era5_pressure_levels_YYYY-MM.nc``: ``z t u v q`` over ``(time, level, latitude, longitude)``;
* ``era5_single_levels_YYYY-MM.nc``: ``msl u10 v10 t2m`` over ``(time, latitude, longitude)``;
* ``era5_static.nc``: ``lsm`` and ``z`` (surface geopotential, the schema's ``orography``; see
  :data:`STATIC_FILE_VARIABLES`) over ``(time, latitude, longitude)`` with a single time step,
  because the CDS serves invariant fields as single-level fields requested for one date.

Coordinates: latitude 90 -> -90 (degrees_north), longitude 0 -> 360 exclusive (degrees_east),
level ascending in hPa (units "millibars"), time int32 "hours since 1900-01-01 00:00:00.0"
(gregorian). Fields are float32, unpacked (the CDS packs to int16, which only loses digits),
stored one 2-D field per chunk so a writer or reader touches one time slice at a time.

Dynamics (every field at step ``i`` depends only on the seed, the date and ``i``):

* climatology: hydrostatically linked temperature and geopotential with a midlatitude
  baroclinic zone that sharpens in winter, a moist tropics, subtropical highs and subpolar lows;
* Rossby-like waves: three per hemisphere, zonal wavenumbers 3-7, travelling eastward at a
  speed set by latitude (jet near 45 deg), level (fastest near 250 hPa) and wavenumber (long
  waves slower), about two 5.6-deg grid cells per 6 h at 500 hPa - faster than real troughs,
  so persistence is a weak baseline - with amplitudes that wax and wane over days;
* winds in geostrophic balance with the geopotential (``msl`` for the 10 m winds, slowed by
  friction), with 1/f regularised near the equator;
* ``t2m`` with a diurnal cycle in local solar time, strongest over land, a seasonal cycle
  and a lapse-rate cooling over orography;
* noise: smooth fields (a few plane waves on the sphere) whose coefficients follow an AR(1)
  process in time, so the noise is partly predictable, never white.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd

from data.schema import STATIC, SURFACE, UPPER_AIR, StoreAttrs, field_encoding, model_channel_order
from parallel.tiling import store_tile_chunks  # geometry only

EARTH_RADIUS = 6.371e6  # m
EARTH_ROTATION = 7.292e-5  # rad s**-1
GRAVITY = 9.80665  # m s**-2
GAS_CONSTANT = 287.05  # dry air, J kg**-1 K**-1
AIR_DENSITY = 1.2  # near the surface, kg m**-3
CDS_TIME_UNITS = "hours since 1900-01-01 00:00:00.0"
STATIC_FILE_VARIABLES = {"lsm": "lsm", "z": "orography"}  # name in era5_static.nc -> schema name

WAVE_SPEED = 2.8  # deg longitude per hour at the jet core and jet level, before dispersion
NOISE_MODES = 12
NOISE_CORRELATION_6H = 0.9
NOISE_SCALE = {"z": 150.0, "t": 0.6, "u": 1.5, "v": 1.5, "q": 0.05, "msl": 120.0, "u10": 1.0, "v10": 1.0, "t2m": 0.6}
VARIABLES = (*UPPER_AIR, *SURFACE)  # fixed order: keys the per-variable noise streams


class SyntheticEarth:
    """The analytic state on a regular grid; a field is a pure function of (time, noise coefficients)."""

    def __init__(self, n_lat: int, n_lon: int, seed: int):
        self.seed = seed
        self.latitude = np.linspace(90.0, -90.0, n_lat)
        self.longitude = np.arange(n_lon) * (360.0 / n_lon)
        self.phi = np.deg2rad(self.latitude)[:, None]
        self.lam = np.deg2rad(self.longitude)[None, :]
        self.baroclinic_zone = (1 + np.tanh((np.abs(self.latitude[:, None]) - 45.0) / 20.0)) / 2  # 0 tropics, 1 poles

        land = self._plane_waves(np.random.default_rng([seed, 0]), 12, (1.5, 4.0)).sum(axis=0)
        coast = np.quantile(land, 0.7)  # ~30% of grid points are land
        self.lsm = np.clip(0.5 + (land - coast) / (0.2 * land.std()), 0, 1).astype(np.float32)
        height = 3000.0 * np.clip((land - coast) / (land.max() - coast), 0, 1) ** 1.5  # m
        self.orography = (GRAVITY * height).astype(np.float32)
        self._noise_basis = self._plane_waves(np.random.default_rng([seed, 1]), NOISE_MODES, (3.0, 8.0))

        rng = np.random.default_rng([seed, 2])
        hemisphere = np.repeat([1.0, -1.0], 3)
        self._wave_center = hemisphere * (np.tile([35.0, 48.0, 60.0], 2) + rng.uniform(-3, 3, 6))
        self._wavenumber = np.concatenate([rng.choice(np.arange(3, 8), 3, replace=False) for _ in range(2)])
        self._wave_phase = rng.uniform(0, 2 * np.pi, 6)
        self._wave_period = rng.uniform(4, 16, 6) * 24  # hours of one growth-decay cycle
        self._wave_modulation_phase = rng.uniform(0, 2 * np.pi, 6)
        self._envelope = np.exp(-(((self.latitude[None, :] - self._wave_center[:, None]) / 10.0) ** 2))
        jet = np.exp(-(((np.abs(self._wave_center) - 45.0) / 25.0) ** 2))
        self._wave_speed = WAVE_SPEED * jet * (1 - 4.0 / self._wavenumber**2)

    def _plane_waves(self, rng: np.random.Generator, modes: int, wavenumbers: tuple[float, float]) -> np.ndarray:
        """``modes`` fields cos(k . r + a) of unit total variance: smooth on the sphere, poles included."""
        direction = rng.normal(size=(modes, 3))
        k = direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(*wavenumbers, (modes, 1))
        r = np.stack(np.broadcast_arrays(np.cos(self.phi) * np.cos(self.lam), np.cos(self.phi) * np.sin(self.lam),
                                         np.sin(self.phi)))
        phase = rng.uniform(0, 2 * np.pi, (modes, 1, 1))
        return (np.sqrt(2.0 / modes) * np.cos(np.einsum("mc,cyx->myx", k, r) + phase)).astype(np.float32)

    def noise_coefficients(self, variable: str, level: int, steps: int, step_hours: int) -> np.ndarray:
        """AR(1) coefficients ``(steps, NOISE_MODES)`` of one channel, from its own random stream."""
        rng = np.random.default_rng([self.seed, 3, VARIABLES.index(variable), level])
        correlation = NOISE_CORRELATION_6H ** (step_hours / 6)
        coefficients = rng.standard_normal((steps, NOISE_MODES))
        for i in range(1, steps):
            coefficients[i] = correlation * coefficients[i - 1] + np.sqrt(1 - correlation**2) * coefficients[i]
        return coefficients.astype(np.float32)

    def _noise(self, variable: str, coefficients: np.ndarray) -> np.ndarray:
        return NOISE_SCALE[variable] * np.tensordot(coefficients, self._noise_basis, axes=1)

    def wave_pattern(self, hours: float, level: float) -> np.ndarray:
        """Sum of the travelling waves at one pressure level, amplitude about 1 in the storm tracks."""
        speed = self._wave_speed * (0.5 + 0.5 * np.exp(-np.log(level / 250.0) ** 2))  # deg per hour
        amplitude = 1 + 0.4 * np.sin(2 * np.pi * hours / self._wave_period + self._wave_modulation_phase)
        phase = self._wavenumber[:, None] * (self.lam - np.deg2rad(speed * hours)[:, None]) + self._wave_phase[:, None]
        return (amplitude[:, None] * self._envelope).T @ np.cos(phase)

    def geostrophic_wind(self, geopotential: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) balancing a geopotential field; 1/f and 1/cos(lat) are tamed near the equator and poles."""
        d_lat = np.gradient(geopotential, self.phi[:, 0], axis=0)
        d_lon = (np.roll(geopotential, -1, axis=1) - np.roll(geopotential, 1, axis=1)) / (2 * self.lam[0, 1])
        inverse_f = np.sin(self.phi) / (2 * EARTH_ROTATION * (np.sin(self.phi) ** 2 + np.sin(np.deg2rad(10)) ** 2))
        inverse_cos = np.cos(self.phi) / (np.cos(self.phi) ** 2 + np.cos(np.deg2rad(88)) ** 2)
        return -inverse_f * d_lat / EARTH_RADIUS, inverse_f * inverse_cos * d_lon / EARTH_RADIUS

    def _calendar(self, time: pd.Timestamp) -> tuple[float, np.ndarray]:
        """Hours since 1900 and the winter index: +1 at the winter pole in mid-January or mid-July."""
        hours = (time - pd.Timestamp("1900-01-01")) / pd.Timedelta(hours=1)
        return hours, np.cos(2 * np.pi * (time.day_of_year - 15) / 365.25) * np.sin(self.phi)

    def upper_air(self, time: pd.Timestamp, level: int, noise: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``z t u v q`` at one pressure level (hPa); ``noise`` maps variable -> AR(1) coefficients."""
        hours, winter = self._calendar(time)
        waves = self.wave_pattern(hours, level)
        troposphere = np.clip(np.log(level / 50.0) / np.log(250.0 / 50.0), 0, 1)  # baroclinicity fades above
        depth = np.log(1000.0 / np.clip(level, 200, 1000))  # ln p thickness of the baroclinic layer below
        contrast = 35.0 * (1 + 0.15 * winter) * self.baroclinic_zone  # K colder than the tropics
        tropical_t, tropical_z = _tropical_column(level)
        z = (tropical_z - GAS_CONSTANT * depth * contrast
             + (800.0 + GAS_CONSTANT * 4.0 * depth) * waves)  # hydrostatic: warm air, thick layers
        u, v = self.geostrophic_wind(z)
        moisture = 2.5e-6 + (0.002 + 0.016 * (1 - self.baroclinic_zone)) * (level / 1000.0) ** 3
        fields = {"z": z, "t": tropical_t + troposphere * (4.0 * waves - contrast), "u": u, "v": v,
                  "q": moisture * np.exp(0.3 * waves + self._noise("q", noise["q"]))}
        return {name: (value if name == "q" else value + self._noise(name, noise[name])).astype(np.float32)
                for name, value in fields.items()}

    def surface(self, time: pd.Timestamp, noise: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``msl u10 v10 t2m``; ``noise`` maps variable -> AR(1) coefficients."""
        hours, winter = self._calendar(time)
        waves = self.wave_pattern(hours, 1000)
        abs_lat = np.abs(self.latitude[:, None])
        subtropical_high, subpolar_low = np.exp(-(((abs_lat - 30) / 12) ** 2)), np.exp(-(((abs_lat - 62) / 12) ** 2))
        msl = 101325.0 + 1200.0 * subtropical_high - 1500.0 * subpolar_low + AIR_DENSITY * 800.0 * waves
        u10, v10 = (0.7 * wind for wind in self.geostrophic_wind(msl / AIR_DENSITY))  # friction slows surface wind
        local_hour = (time.hour + time.minute / 60 + self.longitude[None, :] / 15.0) % 24
        diurnal = (1 + 5 * self.lsm) * (0.3 + 0.7 * np.cos(self.phi)) * np.cos(2 * np.pi * (local_hour - 15) / 24)
        t2m = (300.0 - 44.0 * (1 + 0.15 * winter) * self.baroclinic_zone - 0.0065 * self.orography / GRAVITY
               - (4 + 10 * self.lsm) * winter + diurnal + 3.0 * waves)
        fields = {"msl": msl, "u10": u10, "v10": v10, "t2m": t2m}
        return {name: (value + self._noise(name, noise[name])).astype(np.float32) for name, value in fields.items()}


def _tropical_column(level: float) -> tuple[float, float]:
    """Temperature and geopotential at ``level`` hPa of a tropical column: T = 302 K (p/1000)^0.18 capped
    below at 205 K (the tropopause), integrated hydrostatically from 1013.25 hPa at sea level."""
    kappa, surface, tropopause = 0.18, 302.0, 205.0
    x, x_tropopause = level / 1000.0, (tropopause / surface) ** (1 / kappa)
    ln_p_integral = (surface / kappa * (1.01325**kappa - max(x, x_tropopause) ** kappa)
                     + tropopause * np.log(max(x_tropopause / x, 1.0)))
    return max(surface * x**kappa, tropopause), GAS_CONSTANT * ln_p_integral


def _create_file(path: Path, earth: SyntheticEarth, times: pd.DatetimeIndex, levels=None) -> netCDF4.Dataset:
    """An open netCDF4 file with the CDS dimensions and coordinate variables."""
    dataset = netCDF4.Dataset(path, "w", format="NETCDF4")
    dataset.setncatts({"Conventions": "CF-1.6", "history": "synthetic ERA5-like fields written by data.synthetic"})
    hours = np.asarray((times - pd.Timestamp("1900-01-01")) // pd.Timedelta(hours=1))
    if np.abs(hours).max() > np.iinfo(np.int32).max:
        raise ValueError(f"{path}: times {times[0]}..{times[-1]} do not fit int32 '{CDS_TIME_UNITS}'")
    coordinates = {
        "longitude": (earth.longitude.astype(np.float32), {"units": "degrees_east", "long_name": "longitude"}),
        "latitude": (earth.latitude.astype(np.float32), {"units": "degrees_north", "long_name": "latitude"}),
        "level": (None if levels is None else np.asarray(levels, np.int32),
                  {"units": "millibars", "long_name": "pressure_level"}),
        "time": (hours.astype(np.int32), {"units": CDS_TIME_UNITS, "long_name": "time", "calendar": "gregorian"}),
    }
    for name, (values, attrs) in coordinates.items():
        if values is not None:
            dataset.createDimension(name, len(values))
            variable = dataset.createVariable(name, values.dtype, (name,))
            variable.setncatts(attrs)
            variable[:] = values
    return dataset


def _create_fields(dataset: netCDF4.Dataset, names: Mapping[str, tuple[str, str]], dims: tuple[str, ...]) -> dict:
    chunks = tuple(len(dataset.dimensions[d]) if d in ("latitude", "longitude") else 1 for d in dims)
    variables = {}
    for file_name, (long_name, units) in names.items():
        variables[file_name] = dataset.createVariable(file_name, "f4", dims, chunksizes=chunks)
        variables[file_name].setncatts({"units": units, "long_name": long_name})
    return variables


def generate(output_dir: str | Path, *, grid: tuple[int, int] = (33, 64), levels=(500, 850),
             start: str = "2020-01-01", steps: int = 400, step_hours: int = 6, seed: int = 0, per: str = "month",
             progress: Callable[[Path], None] | None = None) -> list[Path]:
    """Write the static file then pressure- and single-level files per period; return their paths.

    ``progress`` is called with each path once that file is complete.
    """
    n_lat, n_lon = grid
    levels = sorted(int(level) for level in levels)
    if n_lat < 3 or n_lon < 4:
        raise ValueError(f"grid {n_lat}x{n_lon}: expected at least 3 latitudes and 4 longitudes")
    if not levels or len(set(levels)) != len(levels) or not all(1 <= level <= 1000 for level in levels):
        raise ValueError(f"levels {levels}: expected distinct pressure levels in 1..1000 hPa")
    if steps < 1 or step_hours < 1:
        raise ValueError(f"steps={steps}, step_hours={step_hours}: expected positive integers")
    if per not in ("month", "year"):
        raise ValueError(f"per={per!r}: expected 'month' or 'year'")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    times = pd.date_range(pd.Timestamp(start), periods=steps, freq=pd.Timedelta(hours=step_hours))
    earth = SyntheticEarth(n_lat, n_lon, seed)
    noise = {(name, level): earth.noise_coefficients(name, level, steps, step_hours)
             for name in VARIABLES for level in (levels if name in UPPER_AIR else [0])}
    report = progress or (lambda path: None)

    static_path = output_dir / "era5_static.nc"
    with _create_file(static_path, earth, times[:1]) as static:
        names = {file_name: STATIC[schema_name] for file_name, schema_name in STATIC_FILE_VARIABLES.items()}
        variables = _create_fields(static, names, ("time", "latitude", "longitude"))
        variables["lsm"][0], variables["z"][0] = earth.lsm, earth.orography
    report(static_path)
    written = [static_path]

    labels = times.strftime("%Y-%m" if per == "month" else "%Y")
    for label in dict.fromkeys(labels):
        index = np.flatnonzero(labels == label)
        paths = output_dir / f"era5_pressure_levels_{label}.nc", output_dir / f"era5_single_levels_{label}.nc"
        with _create_file(paths[0], earth, times[index], levels) as pressure, \
                _create_file(paths[1], earth, times[index]) as single:
            upper = _create_fields(pressure, UPPER_AIR, ("time", "level", "latitude", "longitude"))
            surface = _create_fields(single, SURFACE, ("time", "latitude", "longitude"))
            for out, i in enumerate(index):
                for level_index, level in enumerate(levels):
                    fields = earth.upper_air(times[i], level, {name: noise[name, level][i] for name in UPPER_AIR})
                    for name, values in fields.items():
                        upper[name][out, level_index] = values
                for name, values in earth.surface(times[i], {name: noise[name, 0][i] for name in SURFACE}).items():
                    surface[name][out] = values
        for path in paths:
            report(path)
        written += paths
    return written


def write_fields_store(path: str | Path, dataset, static: Sequence[str], *, spatial_chunks: tuple[int, int],
                       tile_grid: tuple[int, int], compressed: bool = True, complete: bool = True,
                       time_step_hours: int = 6) -> Path:
    """Write ``dataset`` (surface ``(time, latitude, longitude)``, upper-air ``(time, level, ...)``
    and ``static`` ``(latitude, longitude)`` fields with WeatherBench2-style coordinates) as a store
    of the contract in :mod:`data.schema`: per-channel statistics over all times, root attributes,
    chunks ``time=1, level=1`` and ``spatial_chunks``. For tests and benchmarks; real files go
    through :mod:`data.preprocess`."""
    surface = [n for n, v in dataset.data_vars.items() if v.dims == ("time", "latitude", "longitude")]
    upper_air = [n for n, v in dataset.data_vars.items() if "level" in v.dims]
    levels = [int(level) for level in dataset["level"].values] if upper_air else []
    channels = model_channel_order(surface, upper_air, levels)
    mean, std = [], []
    for channel in channels:
        values = dataset[channel.variable]
        if channel.level is not None:
            values = values.sel(level=channel.level)
        mean.append(float(values.mean()))
        std.append(float(values.std()))
    times = dataset["time"].values
    dataset.attrs = StoreAttrs(
        channels=channels, static_channels=list(static), time_step_hours=time_step_hours, tile_grid=tuple(tile_grid),
        mean=mean, std=std, tendency_std=[1.0] * len(channels),
        static_mean=[float(dataset[name].mean()) for name in static],
        static_std=[float(dataset[name].std()) for name in static],
        statistics_period=(str(times[0])[:10], str(times[-1])[:10]), complete=complete).to_json()
    encoding = {name: field_encoding(variable.dims, spatial_chunks, compressed)
                for name, variable in dataset.data_vars.items()}
    dataset.to_zarr(path, zarr_format=3, consolidated=False, encoding=encoding, mode="w")
    return Path(path)


def write_synthetic_store(path: str | Path, grid: tuple[int, int], levels: Sequence[int], n_times: int, *,
                          tile_grid: tuple[int, int] = (1, 1), compressed: bool = True) -> Path:
    """A store of :class:`SyntheticEarth` fields every 6 h from 2020-01-01, written directly
    (:func:`write_fields_store`, no netCDF files in between): for benchmarks at 0.25 deg."""
    import xarray as xr

    n_lat, n_lon = grid
    levels = sorted(levels)
    times = pd.date_range("2020-01-01", periods=n_times, freq="6h")
    earth = SyntheticEarth(n_lat, n_lon, seed=0)
    noise = {(name, level): earth.noise_coefficients(name, level, n_times, 6)
             for name in (*UPPER_AIR, *SURFACE) for level in (levels if name in UPPER_AIR else [0])}
    upper = {name: np.empty((n_times, len(levels), n_lat, n_lon), np.float32) for name in UPPER_AIR}
    surface = {name: np.empty((n_times, n_lat, n_lon), np.float32) for name in SURFACE}
    for i, time in enumerate(times):
        for j, level in enumerate(levels):
            for name, values in earth.upper_air(time, level, {n: noise[n, level][i] for n in UPPER_AIR}).items():
                upper[name][i, j] = values
        for name, values in earth.surface(time, {n: noise[n, 0][i] for n in SURFACE}).items():
            surface[name][i] = values
    flip = slice(None, None, -1)  # synthetic latitudes run 90 -> -90; the store ascends
    data_vars = {name: (("time", "level", "latitude", "longitude"), values[:, :, flip],
                        {"long_name": UPPER_AIR[name][0], "units": UPPER_AIR[name][1]})
                 for name, values in upper.items()}
    data_vars.update({name: (("time", "latitude", "longitude"), values[:, flip],
                             {"long_name": SURFACE[name][0], "units": SURFACE[name][1]})
                      for name, values in surface.items()})
    static = {"lsm": earth.lsm, "orography": earth.orography}
    data_vars.update({name: (("latitude", "longitude"), values[flip],
                             {"long_name": STATIC[name][0], "units": STATIC[name][1]})
                      for name, values in static.items()})
    dataset = xr.Dataset(data_vars, coords={
        "time": times.values, "level": np.asarray(levels, dtype=np.int64),
        "latitude": ("latitude", earth.latitude[flip].copy(), {"units": "degrees_north"}),
        "longitude": ("longitude", earth.longitude, {"units": "degrees_east"})})
    return write_fields_store(path, dataset, list(static), spatial_chunks=store_tile_chunks(grid, tile_grid),
                              tile_grid=tile_grid, compressed=compressed)


def _grid(text: str) -> tuple[int, int]:
    try:
        n_lat, n_lon = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: expected NLATxNLON, e.g. 33x64 or 721x1440") from None
    return n_lat, n_lon


def _levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {text!r}: expected comma-separated hPa, e.g. 500,850") from None


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="folder for the netCDF files (created if missing)")
    parser.add_argument("--grid", type=_grid, default=(33, 64), help="NLATxNLON, latitudes 90..-90 inclusive "
                        "(default 33x64 = 5.625 deg; 721x1440 = ERA5's 0.25 deg)")
    parser.add_argument("--levels", type=_levels, default=[500, 850], help="hPa, comma-separated (default 500,850)")
    parser.add_argument("--start", default="2020-01-01", help="first time step (default 2020-01-01)")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--steps", type=int, default=400, help="number of time steps (default 400)")
    span.add_argument("--end", help="last time step, inclusive (instead of --steps)")
    parser.add_argument("--step-hours", type=int, default=6, help="hours between steps (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--per", choices=("month", "year"), default="month", help="one file per month or year")
    args = parser.parse_args(argv)
    try:
        if args.end is not None:
            span_hours = (pd.Timestamp(args.end) - pd.Timestamp(args.start)) / pd.Timedelta(hours=1)
            args.steps = int(span_hours // args.step_hours) + 1
        paths = generate(args.output_dir, grid=args.grid, levels=args.levels, start=args.start, steps=args.steps,
                         step_hours=args.step_hours, seed=args.seed, per=args.per, progress=_print_written)
    except ValueError as error:
        parser.error(str(error))
    print(f"{len(paths)} files in {args.output_dir}: grid {args.grid[0]}x{args.grid[1]}, levels "
          f"{sorted(args.levels)} hPa, {args.steps} steps of {args.step_hours} h from {pd.Timestamp(args.start)}")
    return paths


def _print_written(path: Path) -> None:
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)

if __name__ == "__main__":
    main()
