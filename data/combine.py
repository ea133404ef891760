"""Combine normalised inputs into one lazy dataset of the requested variables, levels and times.

Downloads split a period over many files (per month, per variable group); this module
puts the pieces of every variable together along time and checks, with errors that name
the files involved, that the result is one dataset: every requested variable and level
present, one grid, each time once (files that overlap in time must agree where they
overlap; the later copy is dropped), ascending and regularly spaced, the same times for
all variables. Fields come back float32, as dask arrays of ``time_chunk`` times (all
levels) per chunk: one 2-D field per chunk by default; more for small grids, where
per-chunk overhead would cost more than the read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from data.normalize import InputError
from data.schema import STATIC

HOUR = np.timedelta64(1, "h")
TIME_ORIGIN = np.datetime64("1900-01-01T00:00", "ns")  # subsampled steps align to multiples of the step from here
DIMS = {"surface": ("time", "latitude", "longitude"), "upper_air": ("time", "level", "latitude", "longitude"),
        "static": ("latitude", "longitude")}


@dataclass(frozen=True)
class Selection:
    """What to take from the inputs. A None group or ``levels`` means every candidate the inputs
    offer (``data.vocabulary``); ``variables`` narrows every group; None bounds mean all times."""

    surface: Sequence[str] | None = None
    upper_air: Sequence[str] | None = None
    static: Sequence[str] | None = None
    levels: Sequence[int] | None = None
    start: np.datetime64 | None = None
    end: np.datetime64 | None = None
    time_step_hours: int | None = None  # None keeps the input step; a multiple of it subsamples
    variables: Sequence[str] | None = None


@dataclass(frozen=True)
class Combined:
    dataset: xr.Dataset
    time_step_hours: int
    spans: list[tuple[np.datetime64, np.datetime64, str]]  # (first, last, source) of each input piece

    def sources_between(self, first: np.datetime64, last: np.datetime64) -> list[str]:
        """The inputs holding times in [first, last], to name them when reading those times fails."""
        return sorted({source for start, end, source in self.spans if start <= last and end >= first})


def is_static(dataset: xr.Dataset) -> bool:
    """A static input: only fields without a time axis, or known static fields at a single time."""
    single_time = dataset.sizes.get("time", 1) == 1
    return bool(dataset.data_vars) and all("time" not in variable.dims or (name in STATIC and single_time)
                                           for name, variable in dataset.data_vars.items())


def combine_inputs(inputs: Sequence[tuple[str, xr.Dataset]], selection: Selection, time_chunk: int = 1) -> Combined:
    """One dataset from ``(source, normalised dataset)`` pairs; raises :class:`InputError` naming the fault."""
    static_inputs = [(s, d) for s, d in inputs if is_static(d)]
    dynamic_inputs = [(s, d) for s, d in inputs if not is_static(d)]
    _require_variables(inputs, dynamic_inputs, selection)
    reference = next(iter(dynamic_inputs or static_inputs))
    for source, dataset in inputs:
        _check_grid(source, dataset, *reference)
    grid = {"latitude": reference[1]["latitude"].values, "longitude": reference[1]["longitude"].values}

    fields, spans = {}, []
    for group in ("surface", "upper_air"):
        for name in getattr(selection, group):
            pieces = [_field(source, dataset, name, group, selection.levels, time_chunk)
                      for source, dataset in dynamic_inputs if name in dataset]
            joined, piece_spans = _join_in_time(name, pieces)
            fields[name] = _select_period(name, joined, selection).assign_coords(grid)
            spans += piece_spans
    _check_same_times(fields)
    _check_members_across_variables(fields)
    dataset, step = _select_steps(xr.Dataset(fields), selection, spans)
    for name in selection.static:
        source, holder = next((s, d) for s, d in static_inputs + dynamic_inputs if name in d)
        dataset[name] = _static_field(source, holder, name).assign_coords(grid)
    return Combined(dataset, step, spans)


def _require_variables(inputs, dynamic_inputs, selection: Selection) -> None:
    dynamic_names = {str(n) for _, d in dynamic_inputs for n in d.data_vars}
    all_names = {str(n) for _, d in inputs for n in d.data_vars}
    missing = [n for n in [*selection.surface, *selection.upper_air] if n not in dynamic_names]
    missing += [n for n in selection.static if n not in all_names]
    if missing:
        found = "; ".join(f"{source}: {sorted(map(str, d.data_vars)) or 'none'}" for source, d in inputs[:8])
        more = f"; ... ({len(inputs) - 8} more inputs)" if len(inputs) > 8 else ""
        raise InputError(f"variables {missing} not found in any input (ERA5 short names, GRIB names and "
                         f"WeatherBench2 names become the short names; others keep their own); the inputs hold: "
                         f"{found}{more}")


def _describe_grid(dataset: xr.Dataset) -> str:
    lat, lon = dataset["latitude"].values, dataset["longitude"].values
    return (f"{lat.size}x{lon.size} (latitude {lat.min():g}..{lat.max():g}, "
            f"longitude {lon.min():g}..{lon.max():g})")


def _check_grid(source: str, dataset: xr.Dataset, reference_source: str, reference: xr.Dataset) -> None:
    same = all(dataset[k].size == reference[k].size
               and np.allclose(dataset[k].values, reference[k].values, rtol=0, atol=1e-6)
               for k in ("latitude", "longitude"))
    if not same:
        raise InputError(f"{source}: grid {_describe_grid(dataset)} differs from the grid "
                         f"{_describe_grid(reference)} of {reference_source}; expected all inputs on one grid")


def _field(source: str, dataset: xr.Dataset, name: str, group: str, levels: Sequence[int],
           time_chunk: int = 1) -> tuple[str, xr.DataArray]:
    field = dataset[name]
    expected = DIMS[group][:1] + ("member",) * ("member" in field.dims) + DIMS[group][1:]
    if set(field.dims) != set(expected):
        raise InputError(f"{source}: variable {name!r} has dims {field.dims}; expected {expected}")
    if group == "upper_air":
        missing = sorted(set(levels) - set(field["level"].values.tolist()))
        if missing:
            raise InputError(f"{source}: variable {name!r} lacks pressure levels {missing} hPa; it holds "
                             f"{field['level'].values.tolist()}")
        field = field.sel(level=sorted(levels))
    field = field.transpose(*expected)
    _check_ascending(source, field["time"].values)
    chunks = {"time": time_chunk, "member": 1 if time_chunk == 1 else -1, "level": 1 if time_chunk == 1 else -1,
              "latitude": -1, "longitude": -1}
    return source, field.chunk({d: chunks[d] for d in field.dims}).astype(np.float32)


def _check_ascending(source: str, times: np.ndarray) -> None:
    steps = np.diff(times)
    if np.any(steps <= np.timedelta64(0)):
        i = int(np.argmax(steps <= np.timedelta64(0)))
        what = "is repeated" if steps[i] == np.timedelta64(0) else f"is followed by the earlier {times[i + 1]}"
        raise InputError(f"{source}: time {times[i]} (index {i}) {what}; expected strictly ascending times")


def _join_in_time(name: str, pieces: list[tuple[str, xr.DataArray]]):
    """One field along time from its files. Files that overlap in time are accepted when they hold
    identical values at the shared times (the later file's copy is dropped) and refused otherwise."""
    pieces = sorted(pieces, key=lambda piece: piece[1]["time"].values[0])
    _check_same_members(name, pieces)
    kept = pieces[:1]
    for source_b, b in pieces[1:]:
        source_a, a = kept[-1]
        if b["time"].values[0] <= a["time"].values[-1]:
            b = _after_identical_overlap(name, source_a, a, source_b, b)
        if b.sizes["time"]:
            kept.append((source_b, b))
    spans = [(p["time"].values[0], p["time"].values[-1], source) for source, p in kept]
    fields = [p for _, p in kept]
    joined = fields[0] if len(fields) == 1 else xr.concat(
        fields, dim="time", join="override", coords="minimal", compat="override", combine_attrs="override")
    return joined, spans


def _after_identical_overlap(name: str, source_a: str, a: xr.DataArray, source_b: str, b: xr.DataArray):
    """``b`` after the last time of ``a``, once the times they share are checked to hold the same values
    (this reads the shared times now: an overlap is a few steps, a duplicated file all of them)."""
    last = a["time"].values[-1]
    shared = b["time"].values[b["time"].values <= last]
    if not np.isin(shared, a["time"].values).all():
        raise InputError(f"variable {name!r}: {source_a} holds times up to {last} and {source_b} from "
                         f"{b['time'].values[0]}, and their times interleave; expected each time in one file, "
                         f"or files that repeat the same times with the same values")
    for time in shared:
        if not np.array_equal(a.sel(time=time).values, b.sel(time=time).values, equal_nan=True):
            raise InputError(f"variable {name!r}: {source_a} and {source_b} both hold time {time} with different "
                             f"values; expected each time in one file (duplicate or overlapping inputs?), or "
                             f"identical values where files overlap")
    return b.isel(time=slice(shared.size, None))


def _check_same_members(name: str, pieces: list[tuple[str, xr.DataArray]]) -> None:
    def members(field: xr.DataArray) -> list | None:
        return field["member"].values.tolist() if "member" in field.dims else None

    source, reference = pieces[0]
    for other_source, other in pieces[1:]:
        if members(other) != members(reference):
            raise InputError(f"variable {name!r}: {source} holds ensemble members {members(reference)} and "
                             f"{other_source} holds {members(other)}; expected the same members in every file")


def _check_members_across_variables(fields: dict[str, xr.DataArray]) -> None:
    labels = {name: field["member"].values.tolist() if "member" in field.dims else None
              for name, field in fields.items()}
    reference_name, reference = next(iter(labels.items()), (None, None))
    for name, members in labels.items():
        if members != reference:
            raise InputError(f"variables {reference_name!r} and {name!r} hold different ensemble members "
                             f"({reference} and {members}); expected the same members for all variables")


def _check_same_times(fields: dict[str, xr.DataArray]) -> None:
    reference_name, reference = next(iter(fields.items()))
    for name, field in fields.items():
        if not np.array_equal(field["time"].values, reference["time"].values):
            only_here = np.setdiff1d(field["time"].values, reference["time"].values)
            only_there = np.setdiff1d(reference["time"].values, field["time"].values)
            difference = (f"{only_here.size} times only in {name!r} (first {only_here[0]})" if only_here.size else
                          f"{only_there.size} times only in {reference_name!r} (first {only_there[0]})")
            raise InputError(f"variables {name!r} and {reference_name!r} cover different times: {difference}; "
                             f"expected the same times for all variables")


def _select_period(name: str, field: xr.DataArray, selection: Selection) -> xr.DataArray:
    selected = field.sel(time=slice(selection.start, selection.end))
    if selected.sizes["time"] == 0:
        times = field["time"].values
        raise InputError(f"variable {name!r}: no input times within {selection.start}..{selection.end}; the "
                         f"inputs cover {times[0]}..{times[-1]}")
    return selected


def _select_steps(dataset: xr.Dataset, selection: Selection, spans) -> tuple[xr.Dataset, int]:
    """Check the time step is regular and subsample to the requested step."""
    times = dataset["time"].values
    if times.size == 1 and selection.time_step_hours is None:
        raise InputError(f"the inputs hold a single time ({times[0]}), so the time step is unknown; "
                         f"give it with --time-step HOURS")
    step = pd.Series(np.diff(times)).mode()[0].to_timedelta64() if times.size > 1 else selection.time_step_hours * HOUR
    if step % HOUR:
        raise InputError(f"input time step {step / HOUR:g} h is not a whole number of hours")
    irregular = np.flatnonzero(np.diff(times) != step)
    if irregular.size:
        i = int(irregular[0])
        files = sorted({s for first, last, s in spans if first <= times[i + 1] and last >= times[i]})
        raise InputError(f"irregular times: {times[i + 1]} follows {times[i]} ({(times[i + 1] - times[i]) / HOUR:g} h, "
                         f"expected the step of {step / HOUR:g} h) in {files}; missing or extra times "
                         f"({irregular.size} irregular steps in all)")
    input_hours = int(step / HOUR)
    hours = selection.time_step_hours or input_hours
    if hours % input_hours:
        raise InputError(f"time step {hours} h requested, but the inputs are {input_hours}-hourly; expected a "
                         f"multiple of the input step")
    keep = (times - TIME_ORIGIN) % (hours * HOUR) == np.timedelta64(0)
    if not keep.any():
        raise InputError(f"no input time in {times[0]}..{times[-1]} falls on the {hours}-hour steps from 00 UTC")
    return (dataset if keep.all() else dataset.isel(time=np.flatnonzero(keep))), hours


def _static_field(source: str, dataset: xr.Dataset, name: str) -> xr.DataArray:
    """A time-invariant field, taken at the first time when the input has a time axis; loaded."""
    field = dataset[name]
    if "time" in field.dims:
        field = field.isel(time=0, drop=True)
    if set(field.dims) != set(DIMS["static"]):
        raise InputError(f"{source}: static variable {name!r} has dims {field.dims}; expected {DIMS['static']}")
    return field.transpose(*DIMS["static"]).astype(np.float32).load()
