"""An open vocabulary: any CF file preprocesses with no flags, the selection narrows it, the store trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr
import zarr

from data.combine import Selection
from data.normalize import InputError
from data.preprocess import PreprocessError, preprocess
from data.schema import StoreAttrs
from launch.preprocess import main as cli_main
from tests.data.reanalysis_files import expected_field, unusual_dataset, unusual_file
from tests.launch.training.test_train import STEPS, launch, losses, run_values


def run(inputs, output, selection=Selection(), **options):
    return preprocess(inputs, output, selection, progress=False, **options)


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
    return unusual_file(tmp_path_factory.mktemp("unusual") / "reanalysis.nc")


@pytest.fixture(scope="module")
def default_store(unusual, tmp_path_factory):
    """The command with no flag but the output."""
    output = tmp_path_factory.mktemp("store") / "store.zarr"
    assert cli_main([str(unusual), "--output", str(output), "--quiet"]) == 0
    return output


def test_the_command_prints_what_it_took_and_skipped(unusual, tmp_path, capsys):
    assert cli_main([str(unusual), "--output", str(tmp_path / "store.zarr"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "took surface sst tp d2m; upper-air w r on 500 850 hPa; static lsm\n" in printed
    assert f"skipped t_bnds ({unusual}): dims ('time', 'nv')" in printed
    assert "channels   7: sst tp d2m w500 w850 r500 r850" in printed


def test_no_flags_take_every_field_and_say_what_was_skipped(unusual, default_store, capsys, tmp_path):
    summary = run([unusual], tmp_path / "store.zarr")
    assert summary.selection_report == [
        "took surface sst tp d2m; upper-air w r on 500 850 hPa; static lsm",
        f"skipped t_bnds ({unusual}): dims ('time', 'nv'): 'nv' is none of time, pressure level, latitude, "
        f"longitude, ensemble member"]
    attrs = StoreAttrs.from_json(dict(zarr.open_group(default_store, mode="r").attrs))
    assert attrs.channel_names == ["sst", "tp", "d2m", "w500", "w850", "r500", "r850"]
    assert attrs.static_channels == ["lsm"]


def test_values_units_and_long_names_come_from_the_file(unusual, default_store):
    source = xr.open_dataset(unusual)
    stored = xr.open_zarr(default_store, consolidated=False)
    for name in ("sst", "tp", "d2m", "lsm"):
        np.testing.assert_array_equal(stored[name].values, expected_field(source, name), err_msg=name)
        for key in ("long_name", "units"):
            assert stored[name].attrs[key] == source[name].attrs[key], (name, key)
    for name in ("w", "r"):
        for index, level in enumerate((500, 850)):
            np.testing.assert_array_equal(stored[name].sel(level=level).values,
                                          expected_field(source, name)[:, index], err_msg=f"{name}{level}")
    assert stored["longitude"].values.tolist() == [22.5 * i for i in range(16)]
    assert stored["latitude"].values.tolist() == np.linspace(-80, 80, 9).tolist()
    np.testing.assert_array_equal(stored["time"].values, source["t"].values)


def test_selection_flags_narrow_the_candidates(unusual, tmp_path):
    summary = run([unusual], tmp_path / "a.zarr", Selection(variables=["sst", "w", "lsm"], levels=[850]))
    assert summary.channels == ["sst", "w850"] and summary.static == ["lsm"]
    assert summary.selection_report[0] == "took surface sst; upper-air w on 850 hPa; static lsm"
    assert "skipped surface tp d2m: not selected" in summary.selection_report
    summary = run([unusual], tmp_path / "b.zarr", Selection(upper_air=[], static=[], surface=["tp"]))
    assert summary.channels == ["tp"] and summary.static == []
    with pytest.raises(InputError, match=r"--variables \['t2m'\]: not among the inputs' fields; they offer surface "
                                         r"\['d2m', 'sst', 'tp'\]; upper-air \['r', 'w'\]; static \['lsm'\]"):
        run([unusual], tmp_path / "c.zarr", Selection(variables=["2m_temperature"]))


def test_upper_air_levels_default_to_those_every_variable_holds(tmp_path):
    dataset = unusual_dataset(8)
    first = dataset.drop_vars("r")
    second = dataset[["r"]].isel(p=[1])  # relative humidity on 850 hPa only
    first.to_netcdf(tmp_path / "a.nc")
    second.to_netcdf(tmp_path / "b.nc")
    summary = run([tmp_path], tmp_path / "store.zarr")
    assert summary.channels == ["sst", "tp", "d2m", "w850", "r850"]
    assert "skipped w on levels [500] hPa: not held by every upper-air variable" in summary.selection_report


def test_a_single_height_is_no_axis_and_unusable_selections_are_named(tmp_path):
    source = unusual_dataset(8)
    source["t2m"] = source["sst"].expand_dims(height=[2.0], axis=1) - 5.0  # (t, height, y, x), height 2 m
    source["height"].attrs.update(units="m", positive="up")
    source.to_netcdf(tmp_path / "in.nc")
    summary = run([tmp_path / "in.nc"], tmp_path / "store.zarr", Selection(variables=["t2m"]))
    assert summary.channels == ["t2m"]
    stored = xr.open_zarr(tmp_path / "store.zarr", consolidated=False)
    np.testing.assert_array_equal(stored["t2m"].values, expected_field(source, "t2m")[:, 0])

    source[["lsm"]].to_netcdf(tmp_path / "static.nc")
    with pytest.raises(PreprocessError, match=r"no time-dependent fields selected \(took surface none; upper-air "
                                              r"none; static lsm\)"):
        run([tmp_path / "static.nc"], tmp_path / "static.zarr")
    source.assign(tp=source["tp"] * 0).to_netcdf(tmp_path / "dry.nc")
    with pytest.raises(PreprocessError, match=r"channel 'tp' has standard deviation 0.0 .* leave it out with "
                                              r"--variables"):
        run([tmp_path / "dry.nc"], tmp_path / "dry.zarr")


def test_a_store_with_any_channels_trains(default_store, tmp_path):
    """The model's channels come from the store: the demo model trains on the unusual store."""
    launch(1, run_values(default_store, tmp_path))
    curve = losses(tmp_path)
    assert len(curve) == STEPS and all(math.isfinite(loss) for loss in curve)
    assert (tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
