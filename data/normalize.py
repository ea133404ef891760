"""Bring one input dataset to the store's conventions: canonical names, units and orientation.

Reanalysis files spell the same thing many ways: ``latitude``/``lat`` (90 -> -90 or the
reverse), ``longitude`` in 0..360 or -180..180, pressure levels as ``level``,
``isobaricInhPa``, ``pressure_level`` or ``plev`` (hPa or Pa), time as ``time`` or
``valid_time``, variables as ERA5 short names (``t2m``), GRIB names (``2t``) or
WeatherBench2 names (``2m_temperature``). :func:`normalize_dataset` recognises
coordinates by name or CF attributes and returns a dataset with dims ``time, level,
latitude, longitude`` (latitude ascending, longitude ascending in [0, 360), level in
integer hPa ascending, time datetime64[ns]) and the schema's short variable names.
Everything stays lazy: reordering is an index on the file's lazily indexed arrays.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from data.schema import STATIC, SURFACE, UPPER_AIR


class InputError(ValueError):
    """An input file that cannot be used; the message names the file, variable and what was expected."""


COORDINATE_NAMES = {
    "time": ("time", "valid_time"),
    "level": ("level", "isobaricInhPa", "pressure_level", "plev"),
    "latitude": ("latitude", "lat"),
    "longitude": ("longitude", "lon"),
    "member": ("number", "member", "realization", "ensemble_member"),
}
COORDINATE_UNITS = {
    "latitude": {"degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn", "degreen"},
    "longitude": {"degrees_east", "degree_east", "degrees_e", "degree_e", "degreese", "degreee"},
}
COORDINATE_STANDARD_NAMES = {"time": "time", "level": "air_pressure", "latitude": "latitude", "longitude": "longitude"}
HECTOPASCAL_UNITS = {"hpa", "millibars", "millibar", "mbar", "mb", "hectopascal", "hectopascals"}
PASCAL_UNITS = {"pa", "pascal", "pascals"}
STANDARD_CALENDARS = {"standard", "gregorian", "proleptic_gregorian"}

# name in a file -> schema short name (ERA5/CDS short names, GRIB shortNames, WeatherBench2 names)
VARIABLE_ALIASES = {
    "z": "z", "geopotential": "z",
    "t": "t", "temperature": "t",
    "u": "u", "u_component_of_wind": "u",
    "v": "v", "v_component_of_wind": "v",
    "q": "q", "specific_humidity": "q",
    "msl": "msl", "mean_sea_level_pressure": "msl",
    "u10": "u10", "10u": "u10", "10m_u_component_of_wind": "u10",
    "v10": "v10", "10v": "v10", "10m_v_component_of_wind": "v10",
    "t2m": "t2m", "2t": "t2m", "2m_temperature": "t2m",
    "lsm": "lsm", "land_sea_mask": "lsm",
    "slt": "slt", "soil_type": "slt",
    "orography": "orography", "geopotential_at_surface": "orography", "surface_geopotential": "orography",
}
CF_VARIABLE_ATTRIBUTES = ("standard_name", "units", "cell_methods", "comment")
COORDINATE_ATTRIBUTES = {
    "time": {"standard_name": "time", "long_name": "time"},
    "level": {"standard_name": "air_pressure", "long_name": "pressure level", "units": "hPa", "positive": "down"},
    "latitude": {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north"},
    "longitude": {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east"},
}
KNOWN_VARIABLES = {**SURFACE, **UPPER_AIR, **STATIC}


def normalize_dataset(dataset: xr.Dataset, source: str, member: int | None = None) -> xr.Dataset:
    """Canonical coordinates and variable names for one opened input (opened with ``decode_times=False``).

    ``member`` selects one ensemble member by its label; a dataset with several members and
    no ``member`` is refused. Variables the schema does not know are dropped.
    """
    found = {kind: _find_coordinate(dataset, kind) for kind in COORDINATE_NAMES}
    for kind in ("latitude", "longitude"):
        if found[kind] is None:
            raise InputError(f"{source}: no {kind} coordinate (looked for names {COORDINATE_NAMES[kind]} or "
                             f"units {sorted(COORDINATE_UNITS[kind])[:2]}); found {sorted(map(str, dataset.variables))}")
    dataset = _select_member(dataset, found.pop("member"), source, member)
    renames = {name: kind for kind, name in found.items() if name is not None and name != kind}
    dataset = dataset.drop_vars([kind for kind in renames.values() if kind in dataset.variables]).rename(renames)
    present = [kind for kind, name in found.items() if name is not None]
    for kind in present:
        if dataset[kind].ndim > 1:
            raise InputError(f"{source}: coordinate {found[kind]!r} has dims {dataset[kind].dims}; expected a 1-D "
                             f"{kind} axis (regular latitude-longitude grids only)")
    for kind in ("time", "level"):  # a single time or level may come as a scalar coordinate
        if kind in present and dataset[kind].ndim == 0:
            dataset = dataset.expand_dims(kind)

    if "time" in present:
        dataset = dataset.assign_coords(time=decode_time(dataset["time"], found["time"], source))
    if "level" in present:
        dataset = dataset.assign_coords(level=_levels_in_hectopascal(dataset["level"], found["level"], source))
    dataset = _orient_grid(dataset, source)
    dataset = _rename_variables(dataset, source)
    dataset = dataset.drop_vars([name for name in dataset.coords if name not in COORDINATE_ATTRIBUTES])
    for kind in dataset.coords:
        dataset[kind].attrs = dict(COORDINATE_ATTRIBUTES[kind])
    return dataset


def _find_coordinate(dataset: xr.Dataset, kind: str) -> str | None:
    """A dimension by name first, then any coordinate by name, then by CF units or standard_name."""
    names = COORDINATE_NAMES[kind]
    for candidates in (dataset.dims, dataset.coords):
        for name in names:
            if name in candidates:
                return name
    for name, variable in dataset.coords.items():
        units = str(variable.attrs.get("units", "")).lower()
        standard_name = COORDINATE_STANDARD_NAMES.get(kind)  # None for kinds without one (member)
        if units in COORDINATE_UNITS.get(kind, ()) or (
                standard_name is not None and variable.attrs.get("standard_name") == standard_name):
            return str(name)
    return None


def _select_member(dataset: xr.Dataset, name: str | None, source: str, member: int | None) -> xr.Dataset:
    if name is None:
        return dataset
    labels = np.atleast_1d(dataset[name].values).tolist()
    if member is not None and member not in labels:
        raise InputError(f"{source}: ensemble member {member} requested, but {name!r} holds members {labels}")
    if member is None and len(labels) > 1:
        raise InputError(f"{source}: ensemble dimension {name!r} holds {len(labels)} members {labels}; "
                         f"choose one with --member N (the store holds one member)")
    if dataset[name].ndim == 1:
        dataset = dataset.sel({name: labels[0] if member is None else member})
    return dataset.drop_vars(name)


def decode_time(time: xr.DataArray, name: str, source: str) -> xr.Variable:
    """datetime64[ns] times; refuses non-standard calendars and units other than '<unit> since <date>'."""
    variable = time.variable
    if np.issubdtype(variable.dtype, np.datetime64):
        return variable.astype("datetime64[ns]")
    units = str(variable.attrs.get("units", ""))
    calendar = str(variable.attrs.get("calendar", "standard"))
    expected = "expected '<hours|days|minutes|seconds> since <date>' on a standard (gregorian) calendar"
    if " since " not in units:
        raise InputError(f"{source}: time coordinate {name!r} has units {units!r}; {expected}")
    if calendar.lower() not in STANDARD_CALENDARS:
        raise InputError(f"{source}: time coordinate {name!r} uses calendar {calendar!r}; {expected} "
                         f"(one of {sorted(STANDARD_CALENDARS)})")
    try:
        decoded = xr.coders.CFDatetimeCoder(time_unit="ns").decode(variable, name=name)
        return xr.Variable(decoded.dims, np.asarray(decoded.values, dtype="datetime64[ns]"))
    except (ValueError, OverflowError, TypeError) as error:
        raise InputError(f"{source}: cannot decode time coordinate {name!r} with units {units!r} and calendar "
                         f"{calendar!r} ({error}); {expected}") from None


def _levels_in_hectopascal(level: xr.DataArray, name: str, source: str) -> np.ndarray:
    units = str(level.attrs.get("units", "")).strip().lower()
    values = np.asarray(level.values, dtype=np.float64)
    if units in PASCAL_UNITS:
        values = values / 100.0
    elif units not in HECTOPASCAL_UNITS and not (units == "" and values.max(initial=0) <= 1100):
        raise InputError(f"{source}: pressure coordinate {name!r} has units {units or 'none'!r} and values "
                         f"{values.tolist()}; expected hPa (or Pa, converted)")
    if not np.allclose(values, np.round(values)):
        raise InputError(f"{source}: pressure levels {values.tolist()} hPa (from {name!r}) are not whole hPa")
    return np.round(values).astype(np.int64)


def _orient_grid(dataset: xr.Dataset, source: str) -> xr.Dataset:
    """Latitude ascending; longitude wrapped into [0, 360) and ascending (rolls -180..180 grids)."""
    latitude = np.asarray(dataset["latitude"].values, dtype=np.float64)
    if np.any(np.abs(latitude) > 90):
        raise InputError(f"{source}: latitudes outside [-90, 90]: {latitude.min()}..{latitude.max()}")
    longitude = np.mod(np.asarray(dataset["longitude"].values, dtype=np.float64), 360.0)
    for kind, values in (("latitude", latitude), ("longitude", longitude)):
        if np.unique(values).size != values.size:
            raise InputError(f"{source}: repeated {kind} values (after wrapping longitudes into [0, 360)); "
                             f"expected each grid {kind} once")
    dataset = dataset.assign_coords(latitude=latitude, longitude=longitude)
    return dataset.isel(latitude=np.argsort(latitude), longitude=np.argsort(longitude))


def _rename_variables(dataset: xr.Dataset, source: str) -> xr.Dataset:
    """Schema short names; geopotential without a level dimension is the surface geopotential."""
    renames: dict[str, str] = {}
    for name, variable in dataset.data_vars.items():
        canonical = VARIABLE_ALIASES.get(str(name), VARIABLE_ALIASES.get(str(name).lower()))
        if canonical == "z" and "level" not in variable.dims:
            canonical = "orography"
        if canonical is None:
            continue
        if canonical in renames.values():
            other = next(k for k, v in renames.items() if v == canonical)
            raise InputError(f"{source}: variables {other!r} and {name!r} both map to {canonical!r}; "
                             f"expected one of them")
        renames[str(name)] = canonical
    dataset = dataset[list(renames)].rename(renames)
    for name, variable in dataset.data_vars.items():
        attrs = {key: variable.attrs[key] for key in CF_VARIABLE_ATTRIBUTES if key in variable.attrs}
        long_name, units = KNOWN_VARIABLES[name]
        variable.attrs = {"long_name": long_name, "units": units, **attrs, "short_name": name}
    return dataset
