"""Coordinates as they come: grid orientations, files and folders, overlaps, time units and calendars."""

from __future__ import annotations

import warnings

import cftime
import numpy as np
import pytest
import xarray as xr

from data.combine import Selection
from data.normalize import InputError
from data.preprocess import preprocess
from tests.data.reanalysis_files import expected_field, times, unusual_dataset

N_TIMES = 8


def run(inputs, output, **options):
    return preprocess(inputs, output, Selection(variables=["sst", "w"]), progress=False, **options)


def stored(output) -> xr.Dataset:
    return xr.open_zarr(output, consolidated=False)


def assert_store_holds_the_source(output, source: xr.Dataset) -> None:
    store = stored(output)
    np.testing.assert_array_equal(store["sst"].values, expected_field(source, "sst"))
    np.testing.assert_array_equal(store["w"].sel(level=850).values, expected_field(source, "w")[:, 1])
    assert np.all(np.diff(store["longitude"].values) > 0) and np.all(np.diff(store["latitude"].values) > 0)
    assert 0 <= store["longitude"].values.min() and store["longitude"].values.max() < 360


@pytest.mark.parametrize("longitude_start", [-180.0, 0.0, 20.0, 200.0])
@pytest.mark.parametrize("latitude_order", ["north-to-south", "south-to-north"])
def test_any_grid_orientation_is_rolled_to_the_store_grid(tmp_path, longitude_start, latitude_order):
    source = unusual_dataset(N_TIMES, longitude_start=longitude_start)
    if latitude_order == "south-to-north":
        source = source.isel(y=slice(None, None, -1))
    source.to_netcdf(tmp_path / "in.nc")
    run([tmp_path / "in.nc"], tmp_path / "store.zarr")
    assert_store_holds_the_source(tmp_path / "store.zarr", source)
    # a checked point: the source's second column (its longitude modulo 360) at 80 north
    longitude = float(np.mod(source["x"].values[1], 360.0))
    row = int(np.flatnonzero(source["y"].values == 80.0)[0])
    assert stored(tmp_path / "store.zarr")["sst"].sel(latitude=80.0, longitude=longitude).values[3] == \
        source["sst"].values[3, row, 1]


def test_a_folder_of_files_split_in_time_is_one_store(tmp_path):
    source = unusual_dataset(N_TIMES)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for part, times_of_part in enumerate((slice(0, 3), slice(3, 8))):
        source.isel(t=times_of_part).to_netcdf(folder / f"part{part}.nc")
    summary = run([folder], tmp_path / "store.zarr")
    assert summary.n_times == N_TIMES
    assert_store_holds_the_source(tmp_path / "store.zarr", source)


def test_files_that_overlap_with_identical_values_are_joined_and_others_refused_naming_both(tmp_path):
    source = unusual_dataset(N_TIMES)
    source.isel(t=slice(0, 5)).to_netcdf(tmp_path / "a.nc")
    source.isel(t=slice(3, 8)).to_netcdf(tmp_path / "b.nc")  # times 3 and 4 in both files, the same values
    source.isel(t=slice(1, 3)).to_netcdf(tmp_path / "inside.nc")  # a duplicate of part of a.nc
    summary = run([tmp_path / "a.nc", tmp_path / "b.nc", tmp_path / "inside.nc"], tmp_path / "store.zarr")
    assert summary.n_times == N_TIMES
    assert_store_holds_the_source(tmp_path / "store.zarr", source)

    changed = source.isel(t=slice(3, 8)).copy(deep=True)
    changed["sst"][1, 0, 0] += 1.0  # time 4 differs from a.nc
    changed.to_netcdf(tmp_path / "c.nc")
    with pytest.raises(InputError, match=rf"variable 'sst': {tmp_path / 'a.nc'} and {tmp_path / 'c.nc'} both hold "
                                         rf"time 2020-01-02T00:00.* with different values"):
        run([tmp_path / "a.nc", tmp_path / "c.nc"], tmp_path / "other.zarr")
    shifted = source.isel(t=[3, 4])  # three hours before times 3 and 4: between a.nc's times
    shifted.assign_coords(t=shifted["t"].copy(data=shifted["t"].values - 0.125)).to_netcdf(tmp_path / "d.nc")
    with pytest.raises(InputError, match=rf"{tmp_path / 'a.nc'} holds times up to 2020-01-02T00:00.* and "
                                         rf"{tmp_path / 'd.nc'} from .*their times interleave"):
        run([tmp_path / "a.nc", tmp_path / "d.nc"], tmp_path / "other.zarr")
    assert not (tmp_path / "other.zarr").exists()


def with_time_axis(values, units: str, calendar: str) -> xr.Dataset:
    source = unusual_dataset(len(values))
    return source.assign_coords(t=("t", np.asarray(values, dtype=np.float64), {"units": units, "calendar": calendar}))


@pytest.mark.parametrize("units, calendar", [
    ("hours since 1-1-1 00:00:0.0", "standard"),  # NCEP/NCAR reanalysis
    ("days since 0000-01-01", "proleptic_gregorian"),
    ("days since 0000-01-01 00:00:00", "standard"),  # year 0 as udunits writes it: 1 BC
    ("minutes since 2019-12-31 18:00", "gregorian"),
    ("seconds since 1970-01-01", "standard"),
])
def test_time_units_from_any_origin_decode_to_the_true_times(tmp_path, units, calendar):
    expected = times(N_TIMES)
    dates = [cftime.datetime(*t.astype("datetime64[s]").item().timetuple()[:6], calendar=calendar)
             for t in expected]
    with warnings.catch_warnings():  # year 0 on a real calendar: cftime notes that CF does not define it
        warnings.simplefilter("ignore", cftime.CFWarning)
        values = cftime.date2num(dates, units, calendar, has_year_zero="0000" in units or None)
    with_time_axis(values, units, calendar).to_netcdf(tmp_path / "in.nc")
    summary = run([tmp_path / "in.nc"], tmp_path / "store.zarr")
    np.testing.assert_array_equal(stored(tmp_path / "store.zarr")["time"].values, expected)
    assert summary.time_step_hours == 6


def test_a_julian_calendar_is_converted_to_the_same_instants(tmp_path):
    hours = np.arange(N_TIMES) * 6.0
    with_time_axis(hours, "hours since 2020-01-01", "julian").to_netcdf(tmp_path / "in.nc")
    run([tmp_path / "in.nc"], tmp_path / "store.zarr")
    np.testing.assert_array_equal(stored(tmp_path / "store.zarr")["time"].values, times(N_TIMES, "2020-01-14"))


def test_a_noleap_calendar_keeps_its_dates_and_a_leap_day_gap_is_named(tmp_path):
    hours = np.arange(N_TIMES) * 6.0
    with_time_axis(hours, "hours since 2021-02-27", "noleap").to_netcdf(tmp_path / "in.nc")
    run([tmp_path / "in.nc"], tmp_path / "store.zarr")
    np.testing.assert_array_equal(stored(tmp_path / "store.zarr")["time"].values, times(N_TIMES, "2021-02-27"))
    with_time_axis(hours, "hours since 2020-02-28", "noleap").to_netcdf(tmp_path / "leap.nc")
    with pytest.raises(InputError, match=r"irregular times: 2020-03-01T00:00:00.* follows 2020-02-28T18:00:00.* "
                                         r"\(30 h, expected the step of 6 h\)"):
        run([tmp_path / "leap.nc"], tmp_path / "leap.zarr")


@pytest.mark.parametrize("units, calendar, attrs, message", [
    ("months since 2000-01-01", "standard", {}, r"time coordinate 't' \(units 'months since 2000-01-01'\) is a "
                                                r"climatological or calendar-month axis \(12 values\)"),
    ("days since 2000-01-01", "standard", {"climatology": "climatology_bounds"},
     r"time coordinate 't' \(units 'days since 2000-01-01'\) is a climatological or calendar-month axis"),
    ("hours since 2021-02-28", "all_leap", {}, r"time coordinate 't' uses calendar 'all_leap', and its date "
                                               r"2021-02-29T00:00:00 \(index 4\) exists in no real calendar; "
                                               r"convert it to the standard calendar"),
    ("hours since 2020-01-01", "mars", {}, r"time coordinate 't' uses calendar 'mars', which is not a CF calendar"),
], ids=["months", "climatology", "all_leap", "unknown-calendar"])
def test_time_axes_a_store_cannot_hold_are_refused(tmp_path, units, calendar, attrs, message):
    values = np.arange(12.0) * (1 if units.startswith("months") else 6)
    source = with_time_axis(values, units, calendar)
    source["t"].attrs.update(attrs)
    source.to_netcdf(tmp_path / "in.nc")
    with pytest.raises(InputError, match=rf"{tmp_path / 'in.nc'}: {message}"):
        run([tmp_path / "in.nc"], tmp_path / "store.zarr")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.drop_vars("y"), r"no latitude axis identified \(looked for name latitude/lat, axis='Y'"),
    (lambda d: d.assign_coords(x=("x", d["x"].values, {})), r"no longitude axis identified \(looked for name "
                                                             r"longitude/lon, axis='X'"),
    (lambda d: d.assign_coords(t=("t", np.arange(d.sizes["t"]), {})), r"no time axis identified: variable 'sst' "
                                                                      r"has dimension 't'"),
    (lambda d: d.rename(y="lat").drop_vars("lat"), r"dimension 'lat' \(latitude\) has no coordinate values"),
], ids=["latitude-without-values", "longitude-without-attributes", "time-without-attributes", "lat-positions"])
def test_axes_that_cannot_be_identified_are_refused_naming_file_and_axis(tmp_path, change, message):
    change(unusual_dataset(N_TIMES)).to_netcdf(tmp_path / "in.nc")
    with pytest.raises(InputError, match=rf"{tmp_path / 'in.nc'}: .*({message})"):
        run([tmp_path / "in.nc"], tmp_path / "store.zarr")
