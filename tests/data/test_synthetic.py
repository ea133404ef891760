"""Synthetic ERA5-like files: CDS layout, determinism, plausible values and learnable dynamics."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from data.schema import STATIC, SURFACE, UPPER_AIR
from data.synthetic import CDS_TIME_UNITS, STATIC_FILE_VARIABLES, generate

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_files(tmp_path_factory) -> list[Path]:
    """The default data set (33x64, 500 and 850 hPa, 400 six-hourly steps from 2020-01-01)."""
    return generate(tmp_path_factory.mktemp("synthetic"))


def _open_all(files: list[Path], kind: str) -> xr.Dataset:
    return xr.concat([xr.load_dataset(f) for f in files if f.name.startswith(f"era5_{kind}_")], dim="time")


def _read_everything(files: list[Path]) -> dict[str, np.ndarray]:
    return {f"{f.name}/{name}": values.values for f in files for name, values in xr.load_dataset(f).items()}


def test_writes_one_file_per_month_and_kind(default_files):
    names = [f.name for f in default_files]
    months = ["2020-01", "2020-02", "2020-03", "2020-04"]  # 400 steps of 6 h end on 2020-04-09
    expected = ["era5_static.nc"] + [f"era5_{kind}_{m}.nc" for m in months for kind in ("pressure_levels", "single_levels")]
    assert names == expected
    assert all(f.is_file() for f in default_files)


def test_pressure_level_file_has_cds_layout(default_files):
    with xr.open_dataset(default_files[1]) as ds:
        assert dict(ds.sizes) == {"time": 124, "level": 2, "latitude": 33, "longitude": 64}
        assert set(ds.data_vars) == set(UPPER_AIR)
        for name, (long_name, units) in UPPER_AIR.items():
            assert ds[name].dims == ("time", "level", "latitude", "longitude")
            assert ds[name].dtype == np.float32
            assert (ds[name].attrs["long_name"], ds[name].attrs["units"]) == (long_name, units)
        np.testing.assert_array_equal(ds.level, [500, 850])
        assert ds.level.dtype == np.int32
        assert ds.level.attrs == {"units": "millibars", "long_name": "pressure_level"}
        _assert_cds_coordinates(ds)


def test_single_level_and_static_files_have_cds_layout(default_files):
    with xr.open_dataset(default_files[2]) as ds:
        assert set(ds.data_vars) == set(SURFACE)
        for name, (long_name, units) in SURFACE.items():
            assert ds[name].dims == ("time", "latitude", "longitude")
            assert (ds[name].attrs["long_name"], ds[name].attrs["units"]) == (long_name, units)
        _assert_cds_coordinates(ds)
    with xr.open_dataset(default_files[0]) as ds:
        assert dict(ds.sizes) == {"time": 1, "latitude": 33, "longitude": 64}
        for file_name, schema_name in STATIC_FILE_VARIABLES.items():
            assert ds[file_name].dims == ("time", "latitude", "longitude")
            assert (ds[file_name].attrs["long_name"], ds[file_name].attrs["units"]) == STATIC[schema_name]
        _assert_cds_coordinates(ds)


def _assert_cds_coordinates(ds: xr.Dataset) -> None:
    np.testing.assert_allclose(ds.latitude, np.linspace(90, -90, 33))
    np.testing.assert_allclose(ds.longitude, np.arange(64) * 5.625)
    assert ds.latitude.attrs["units"] == "degrees_north" and ds.longitude.attrs["units"] == "degrees_east"
    assert ds.time.encoding["units"] == CDS_TIME_UNITS
    assert ds.time.encoding["calendar"] == "gregorian"
    assert ds.time.encoding["dtype"] == np.int32
    assert ds.time.values[0] >= np.datetime64("2020-01-01")


def test_time_axis_runs_on_across_files(default_files):
    times = _open_all(default_files, "single_levels").time.values
    expected = np.datetime64("2020-01-01") + np.arange(400) * np.timedelta64(6, "h")
    np.testing.assert_array_equal(times, expected)
    raw = xr.open_dataset(default_files[1], decode_times=False).time.values
    assert raw.dtype == np.int32 and raw[0] == 1051896  # hours from 1900-01-01 to 2020-01-01


def test_fields_are_finite_and_plausible(default_files):
    upper = _open_all(default_files, "pressure_levels")
    surface = _open_all(default_files, "single_levels")
    static = xr.load_dataset(default_files[0])
    for ds in (upper, surface, static):
        for name, values in ds.items():
            assert np.isfinite(values).all(), name
    weights = np.cos(np.deg2rad(upper.latitude))

    def area_mean(field):
        return float(field.weighted(weights).mean())

    assert 5.3e4 < area_mean(upper.z.sel(level=500)) < 5.7e4
    assert 4.5e4 < upper.z.sel(level=500).min() and upper.z.sel(level=500).max() < 6.0e4
    assert 272 < area_mean(upper.t.sel(level=850)) < 290 and 225 < upper.t.min() and upper.t.max() < 305
    assert 0 < upper.q.min() and upper.q.max() < 0.03 and 1e-3 < area_mean(upper.q.sel(level=850)) < 1e-2
    assert abs(upper.u).max() < 80 and abs(upper.v).max() < 80 and abs(surface.u10).max() < 40
    assert 0 < area_mean(upper.u.sel(level=500)) < 20  # westerlies prevail aloft
    assert 9.6e4 < surface.msl.min() and surface.msl.max() < 1.06e5 and 1.005e5 < area_mean(surface.msl) < 1.02e5
    assert 215 < surface.t2m.min() and surface.t2m.max() < 320 and 280 < area_mean(surface.t2m) < 292
    assert 0 <= static.lsm.min() and static.lsm.max() <= 1 and 0.2 < float(static.lsm.mean()) < 0.45
    assert 0 <= static.z.min() and 1e4 < static.z.max() < 6e4


def test_same_seed_same_files_other_seed_other_fields(tmp_path):
    small = dict(grid=(9, 16), levels=(850, 500), steps=6)
    first = _read_everything(generate(tmp_path / "a", seed=1, **small))
    again = _read_everything(generate(tmp_path / "b", seed=1, **small))
    other = _read_everything(generate(tmp_path / "c", seed=2, **small))
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert not np.allclose(first["era5_pressure_levels_2020-01.nc/z"], other["era5_pressure_levels_2020-01.nc/z"])
    assert not np.allclose(first["era5_static.nc/lsm"], other["era5_static.nc/lsm"])


def test_waves_travel_eastward_more_than_a_grid_cell_per_step(default_files):
    z500 = _open_all(default_files, "pressure_levels").z.sel(level=500, latitude=slice(60, 30)).values
    anomaly = z500 - z500.mean(axis=(0, 2), keepdims=True)
    shifts = np.arange(-6, 7)
    # correlation of x(t+1) with x(t) moved east by s cells, over all steps and midlatitude rows
    correlation = [np.corrcoef(anomaly[1:].ravel(), np.roll(anomaly[:-1], s, axis=-1).ravel())[0, 1] for s in shifts]
    assert shifts[np.argmax(correlation)] >= 2
    assert max(correlation) > 0.9 > correlation[shifts.tolist().index(0)]


def test_t2m_diurnal_cycle_peaks_mid_afternoon_local_time_and_mostly_over_land(default_files):
    surface = _open_all(default_files, "single_levels")
    lsm = xr.load_dataset(default_files[0]).lsm.isel(time=0).values
    local_hour = surface.time.dt.hour.values[:, None, None] + surface.longitude.values[None, None, :] / 15
    anomaly = surface.t2m.values - surface.t2m.values.mean(axis=0)
    daily_harmonic = np.mean(anomaly * np.exp(-2j * np.pi * local_hour / 24), axis=0)  # (latitude, longitude)
    amplitude, warmest_hour = 2 * np.abs(daily_harmonic), (-np.angle(daily_harmonic) * 24 / (2 * np.pi)) % 24
    land, sea = lsm > 0.9, lsm < 0.1
    assert np.median(amplitude[land]) > 3 * np.median(amplitude[sea])
    assert abs(np.median(warmest_hour[land]) - 15) < 1


@pytest.mark.parametrize("kind, name, level", [("pressure_levels", "z", 500), ("single_levels", "t2m", None)])
def test_dynamics_are_learnable_beyond_persistence(default_files, kind, name, level):
    """A per-point linear map from a zonal neighbourhood of x(t) and the time of day to x(t+6h), fitted
    by least squares on 300 steps, beats persistence on the 99 held-out steps by at least 30% RMSE."""
    ds = _open_all(default_files, kind)
    field = (ds[name] if level is None else ds[name].sel(level=level)).values.astype(np.float64)
    field -= field[:300].mean(axis=0)
    day_angle = 2 * np.pi * ds.time.dt.hour.values / 24
    neighbours = [np.roll(field, -shift, axis=-1) for shift in range(-4, 5)]
    clock = [np.broadcast_to(f(day_angle)[:, None, None], field.shape) for f in (np.cos, np.sin, np.ones_like)]
    features = np.stack(neighbours + clock, axis=-1)  # (time, latitude, longitude, feature)
    inputs, targets, train = features[:-1], field[1:], slice(0, 300)
    gram = np.einsum("tyxf,tyxg->yxfg", inputs[train], inputs[train])
    gram += 1e-6 * np.trace(gram, axis1=-2, axis2=-1)[..., None, None] * np.eye(gram.shape[-1])
    weights = np.linalg.solve(gram, np.einsum("tyxf,tyx->yxf", inputs[train], targets[train])[..., None])[..., 0]
    held_out = slice(300, None)
    predicted = np.einsum("tyxf,yxf->tyx", inputs[held_out], weights)
    model_rmse = np.sqrt(np.mean((predicted - targets[held_out]) ** 2))
    persistence_rmse = np.sqrt(np.mean((field[300:-1] - targets[held_out]) ** 2))
    assert model_rmse < 0.7 * persistence_rmse, (name, model_rmse, persistence_rmse)


def test_cli_help_and_write(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "data.synthetic", "--help"], cwd=REPOSITORY,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--grid", "--levels", "--start", "--steps", "--end", "--step-hours", "--seed", "--per"):
        assert flag in help_text
    result = subprocess.run(
        [sys.executable, "-m", "data.synthetic", str(tmp_path), "--grid", "5x8", "--levels", "850,50,500",
         "--start", "2020-12-31T12", "--end", "2021-01-01T12", "--step-hours", "12", "--per", "year"],
        cwd=REPOSITORY, capture_output=True, text=True, check=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["era5_pressure_levels_2020.nc", "era5_pressure_levels_2021.nc", "era5_single_levels_2020.nc",
                       "era5_single_levels_2021.nc", "era5_static.nc"]
    assert all(str(tmp_path / name) in result.stdout for name in written)
    with xr.open_dataset(tmp_path / "era5_pressure_levels_2021.nc") as ds:
        np.testing.assert_array_equal(ds.level, [50, 500, 850])
        assert dict(ds.sizes) == {"time": 2, "level": 3, "latitude": 5, "longitude": 8}


@pytest.mark.parametrize("arguments, message", [(["--grid", "33by64"], "--grid"), (["--levels", "500,x"], "--levels"),
                                                (["--levels", "1200"], "levels"), (["--per", "week"], "--per")])
def test_cli_names_the_bad_argument(tmp_path, capsys, arguments, message):
    from data.synthetic import main

    with pytest.raises(SystemExit):
        main([str(tmp_path), *arguments])
    assert message in capsys.readouterr().err
