"""Decode an input's CF time coordinate into real datetime64[ns] times, whatever its calendar.

xarray (through cftime) reads every CF calendar; this module decides what the decoded
dates mean for a store, whose time axis is real (proleptic Gregorian) time:

* ``standard``, ``gregorian``, ``proleptic_gregorian``: the dates as they are; a reference
  date in year 0 (``days since 0000-01-01``), which these calendars lack under CF, is read
  the way udunits writes it: year 0 is 1 BC (astronomical year numbering);
* ``julian``: converted to the same instants in the Gregorian calendar (2020-01-01 Julian
  is 2020-01-14 Gregorian);
* ``noleap``/``365_day``, ``all_leap``/``366_day``, ``360_day``: model calendars whose dates
  are labels of real days; decoded by their labels when every one is a real date (a
  ``noleap`` axis then skips 29 February, which the regular-step check names), and refused
  naming the first date no real calendar has (``360_day``'s 30 February).

A climatological axis (a CF ``climatology`` attribute, or ``months``/``years since``
units, which have no fixed length) is refused: a store holds states at a regular step.
Errors are ``ValueError`` with a message that names the coordinate and what to do; the
caller adds the file.
"""

from __future__ import annotations

import warnings

import cftime
import numpy as np
import xarray as xr

REAL_CALENDARS = {"standard", "gregorian", "proleptic_gregorian"}
LABEL_CALENDARS = {"noleap", "365_day", "all_leap", "366_day", "360_day"}
CONVERT_HINT = ("convert it to the standard calendar first, e.g. with xarray: "
                "ds.convert_calendar('standard', align_on='date') (or `cdo setcalendar`)")


def decode_time(time: xr.DataArray, name: str) -> np.ndarray:
    """datetime64[ns] times of the coordinate ``time`` (named ``name`` in its file)."""
    variable = time.variable
    if np.issubdtype(variable.dtype, np.datetime64):
        return np.asarray(variable.values, dtype="datetime64[ns]")
    units = str(variable.attrs.get("units", ""))
    calendar = str(variable.attrs.get("calendar", "standard")).lower()
    expected = "expected '<days|hours|minutes|seconds> since <date>'"
    if " since " not in units:
        raise ValueError(f"time coordinate {name!r} has units {units!r}; {expected}")
    if "climatology" in variable.attrs or units.split()[0].lower() in {"month", "months", "year", "years"}:
        raise ValueError(f"time coordinate {name!r} (units {units!r}) is a climatological or calendar-month axis "
                         f"({variable.size} values); a store needs states at a regular step in hours: give "
                         f"the analyses themselves, not monthly means or a climatology")
    if calendar not in REAL_CALENDARS | LABEL_CALENDARS | {"julian"}:
        raise ValueError(f"time coordinate {name!r} uses calendar {calendar!r}, which is not a CF calendar; "
                         f"expected one of {sorted(REAL_CALENDARS | LABEL_CALENDARS | {'julian'})}")
    if calendar in REAL_CALENDARS:  # xarray's vectorised decoding, when it gives datetime64 (the common case)
        fast = _datetime64_dates(variable, name)
        if fast is not None:
            return fast
    dates = _cftime_dates(np.asarray(variable.values), units, calendar, name)
    if calendar == "julian":
        dates = [date.change_calendar("proleptic_gregorian") for date in dates]
    return _as_datetime64(dates, calendar, name)


def _datetime64_dates(variable: xr.Variable, name: str) -> np.ndarray | None:
    with warnings.catch_warnings():  # decoding is lazy: the values are read inside
        warnings.simplefilter("ignore")
        try:
            values = np.atleast_1d(np.asarray(xr.coders.CFDatetimeCoder(time_unit="ns").decode(variable, name=name)
                                              .values))
        except (ValueError, OverflowError, TypeError):
            return None
    return values.astype("datetime64[ns]") if np.issubdtype(values.dtype, np.datetime64) else None


def _cftime_dates(values: np.ndarray, units: str, calendar: str, name: str) -> list:
    """cftime dates through xarray's CF decoding; a year-0 reference on a real calendar as udunits reads it."""
    variable = xr.Variable(("time",), values, {"units": units, "calendar": calendar})
    # warnings: xarray pads a reference year below 1000; cftime notes that CF has no year 0 in real calendars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return list(np.atleast_1d(xr.coders.CFDatetimeCoder(use_cftime=True).decode(variable, name=name).values))
        except (ValueError, OverflowError, TypeError) as error:
            if calendar in REAL_CALENDARS and _reference_year(units) == 0:
                return list(np.atleast_1d(cftime.num2date(values, units, calendar, has_year_zero=True)))
            raise ValueError(f"cannot decode time coordinate {name!r} with units {units!r} and calendar {calendar!r} "
                             f"({error})") from None


def _reference_year(units: str) -> int | None:
    try:
        return int(units.split(" since ")[1].strip().split("-")[0])
    except (IndexError, ValueError):
        return None


def _as_datetime64(dates: list, calendar: str, name: str) -> np.ndarray:
    """Real datetime64[ns] times from cftime dates, refusing labels no real calendar has."""
    out = np.empty(len(dates), dtype="datetime64[ns]")
    for i, date in enumerate(dates):
        label = (f"{date.year:04d}-{date.month:02d}-{date.day:02d}T{date.hour:02d}:{date.minute:02d}:"
                 f"{date.second:02d}.{date.microsecond:06d}")
        if not 1678 <= date.year <= 2261:  # the years datetime64[ns] holds
            raise ValueError(f"time coordinate {name!r}: date {label[:19]} (index {i}) is outside the years "
                             f"1678..2261 that a store's nanosecond times hold; check its units")
        try:
            out[i] = np.datetime64(label, "ns")
        except ValueError:
            raise ValueError(f"time coordinate {name!r} uses calendar {calendar!r}, and its date {label[:19]} "
                             f"(index {i}) exists in no real calendar; {CONVERT_HINT}") from None
    return out
