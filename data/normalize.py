"""Bring one input dataset to the store's conventions: axes, names, units and orientation.

Reanalysis files spell the same thing many ways. Axes are recognised by name
(``latitude``/``lat``, ``level``/``isobaricInhPa``/``plev``, ``time``/``valid_time``...) or
by their CF attributes (``axis``, ``standard_name``, ``units`` such as ``degrees_north``,
``hPa`` or ``<unit> since <date>``, ``positive``), never by position: an axis without
coordinate values is refused. :func:`normalize_dataset` returns a dataset with dims
``time, level, latitude, longitude`` (latitude ascending, longitude ascending in [0, 360),
level in integer hPa ascending, time datetime64[ns]).

The vocabulary is open: every numeric variable over time, latitude and longitude (and
optionally a pressure level) is kept. Known ERA5 short names, GRIB names and WeatherBench2
names become the schema's short names (``2m_temperature`` -> ``t2m``); other variables keep
their own names, units and long names. Variables over other axes are dropped, and why is
recorded in the dataset's ``skipped_variables`` attribute for the run's report.
Everything stays lazy: reordering is an index on the file's lazily indexed arrays.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from data.schema import STATIC, SURFACE, UPPER_AIR
from data.time_axis import decode_time


class InputError(ValueError):
    """An input file that cannot be used; the message names the file, variable and what was expected."""


AXES = ("time", "level", "latitude", "longitude", "member")
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
COORDINATE_STANDARD_NAMES = {"time": {"time"}, "level": {"air_pressure"}, "latitude": {"latitude"},
                             "longitude": {"longitude"}, "member": {"realization"}}
CF_AXES = {"time": "T", "level": "Z", "latitude": "Y", "longitude": "X"}
HECTOPASCAL_UNITS = {"hpa", "millibars", "millibar", "mbar", "mb", "hectopascal", "hectopascals"}
PASCAL_UNITS = {"pa", "pascal", "pascals"}
AXIS_HINTS = {
    "time": "name time/valid_time, axis='T', standard_name='time' or units '<unit> since <date>'",
    "latitude": "name latitude/lat, axis='Y', standard_name='latitude' or units 'degrees_north'",
    "longitude": "name longitude/lon, axis='X', standard_name='longitude' or units 'degrees_east'",
}

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
    "member": {"standard_name": "realization", "long_name": "ensemble member"},
}
KNOWN_VARIABLES = {**SURFACE, **UPPER_AIR, **STATIC}


def normalize_dataset(dataset: xr.Dataset, source: str, member: int | str | None = None) -> xr.Dataset:
    """Canonical axes and variable names for one opened input (opened with ``decode_times=False``).

    ``member`` selects one ensemble member by its label, or ``"all"`` keeps the ``member``
    axis; a dataset with several members and no ``member`` is refused. Variables that are
    not fields over the recognised axes are dropped, with the reason recorded.
    """
    found = {kind: _find_coordinate(dataset, kind, source) for kind in AXES}
    for kind in ("latitude", "longitude"):
        if found[kind] is None:
            raise InputError(f"{source}: no {kind} axis identified (looked for {AXIS_HINTS[kind]}); the file "
                             f"holds {sorted(map(str, dataset.variables))}")
    if found["time"] is None:
        _refuse_unidentified_time(dataset, found, source)
    dataset = _select_member(dataset, found["member"], source, member)
    if member != "all":
        found["member"] = None
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
        try:
            dataset = dataset.assign_coords(time=decode_time(dataset["time"], found["time"]))
        except ValueError as error:
            raise InputError(f"{source}: {error}") from None
    if "level" in present:
        dataset = dataset.assign_coords(level=_levels_in_hectopascal(dataset["level"], found["level"], source))
    dataset = _orient_grid(dataset, source)
    dataset = _candidate_variables(dataset, source)
    dataset = dataset.drop_vars([name for name in dataset.coords if name not in COORDINATE_ATTRIBUTES])
    for kind in dataset.coords:
        dataset[kind].attrs = dict(COORDINATE_ATTRIBUTES[kind])
    return dataset


def _find_coordinate(dataset: xr.Dataset, kind: str, source: str) -> str | None:
    """A dimension or coordinate by name, then a coordinate by its CF attributes; an axis found
    as a dimension without coordinate values is refused (positions are not coordinates)."""
    found = next((name for candidates in (dataset.dims, dataset.coords) for name in COORDINATE_NAMES[kind]
                  if name in candidates), None)
    if found is None:
        found = next((str(name) for name, variable in dataset.coords.items() if _has_cf_attributes(variable, kind)),
                     None)
    if found is not None and found not in dataset.variables:
        raise InputError(f"{source}: dimension {found!r} ({kind}) has no coordinate values; expected a "
                         f"coordinate variable {found!r} holding its {kind}s (they are never made up from "
                         f"row positions)")
    return found


def _has_cf_attributes(variable: xr.DataArray, kind: str) -> bool:
    attrs = variable.attrs
    units = str(attrs.get("units", "")).strip().lower()
    if attrs.get("standard_name") in COORDINATE_STANDARD_NAMES[kind]:
        return True
    if kind == "level":  # a vertical axis is a pressure level only when its units say pressure
        pressure = units in HECTOPASCAL_UNITS | PASCAL_UNITS
        return pressure and (str(attrs.get("axis", "")).upper() == "Z" or "positive" in attrs)
    if str(attrs.get("axis", "")).upper() == CF_AXES.get(kind):
        return True
    return units in COORDINATE_UNITS.get(kind, ()) or (kind == "time" and " since " in units)


def _refuse_unidentified_time(dataset: xr.Dataset, found: dict[str, str | None], source: str) -> None:
    """Without a time axis a file holds static fields only; a field with another axis is refused."""
    known = {name for name in found.values() if name is not None}
    for name, variable in dataset.data_vars.items():
        others = [str(d) for d in variable.dims if d not in known]
        if {found["latitude"], found["longitude"]} <= set(variable.dims) and others:
            raise InputError(f"{source}: no time axis identified: variable {name!r} has dimension {others[0]!r}, "
                             f"which is none of time, pressure level, latitude, longitude or ensemble member "
                             f"(a time axis needs {AXIS_HINTS['time']})")


def _select_member(dataset: xr.Dataset, name: str | None, source: str, member: int | str | None) -> xr.Dataset:
    if name is None:  # inputs without members (static fields, say) serve every member
        return dataset
    labels = np.atleast_1d(dataset[name].values).tolist()
    if member == "all":
        return dataset if dataset[name].ndim == 1 else dataset.expand_dims(name)
    if member is not None and member not in labels:
        raise InputError(f"{source}: ensemble member {member} requested, but {name!r} holds members {labels}")
    if member is None and len(labels) > 1:
        raise InputError(f"{source}: ensemble dimension {name!r} holds {len(labels)} members {labels}; "
                         f"choose one with --member N, or keep them all with --members all")
    if dataset[name].ndim == 1:
        dataset = dataset.sel({name: labels[0] if member is None else member})
    return dataset.drop_vars(name)


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


def _candidate_variables(dataset: xr.Dataset, source: str) -> xr.Dataset:
    """The fields over recognised axes, under schema names where known (geopotential without a level
    is the surface geopotential); the rest are dropped with the reason in ``skipped_variables``."""
    # a single height above ground, say (2 m temperature over time, height, latitude, longitude), is no axis
    dataset = dataset.assign({name: variable.squeeze(single, drop=True) for name, variable in dataset.data_vars.items()
                              if (single := [d for d in variable.dims if d not in AXES and dataset.sizes[d] == 1])})
    kept, skipped, renames = [], {}, {}
    for name, variable in dataset.data_vars.items():
        reason = _not_a_field(variable)
        if reason:
            skipped[str(name)] = reason
            continue
        canonical = VARIABLE_ALIASES.get(str(name), VARIABLE_ALIASES.get(str(name).lower(), str(name)))
        if canonical == "z" and "level" not in variable.dims:
            canonical = "orography"
        if canonical in renames.values():
            other = next(k for k, v in renames.items() if v == canonical)
            raise InputError(f"{source}: variables {other!r} and {name!r} both map to {canonical!r}; "
                             f"expected one of them")
        kept.append(str(name))
        renames[str(name)] = canonical
    dataset = dataset[kept].rename({k: v for k, v in renames.items() if k != v})
    for name, variable in dataset.data_vars.items():
        attrs = {key: variable.attrs[key] for key in CF_VARIABLE_ATTRIBUTES if key in variable.attrs}
        long_name, units = KNOWN_VARIABLES.get(name, (variable.attrs.get("long_name", name), attrs.get("units")))
        variable.attrs = {"long_name": long_name, **({"units": units} if units is not None else {}),
                          **{k: v for k, v in attrs.items() if k != "units"}, "short_name": name}
    dataset.attrs = {"skipped_variables": skipped}
    return dataset


def _not_a_field(variable: xr.DataArray) -> str | None:
    """Why a variable is no channel or static field, or None for one."""
    if not np.issubdtype(variable.dtype, np.number) or np.issubdtype(variable.dtype, np.timedelta64):
        return f"not numeric ({variable.dtype})"
    dims = tuple(map(str, variable.dims))
    other = [d for d in dims if d not in AXES]
    if other:
        return f"dims {dims}: {other[0]!r} is none of time, pressure level, latitude, longitude, ensemble member"
    if not {"latitude", "longitude"} <= set(dims):
        return f"dims {dims}: not a field over latitude and longitude"
    return None
