"""Missing values per variable: fail naming them, fill with the channel mean, or fill and add a mask channel."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from data.combine import Selection
from data.preprocess import PreprocessError, preprocess
from data.reader import TileReader
from data.schema import StoreAttrs
from launch.preprocess import main as cli_main
from tests.data.reanalysis_files import GRID, expected_field, unusual_dataset

N_TIMES = 8
LAND = (slice(0, 3), slice(2, 6))  # rows (north to south in the file) and columns where sst has no value


@pytest.fixture(scope="module")
def ocean_file(tmp_path_factory):
    """sst missing over 'land' at every time, as a declared _FillValue; w missing at one point of 850 hPa at step 5."""
    source = unusual_dataset(N_TIMES)
    source["sst"][(slice(None), *LAND)] = np.nan
    source["w"][5, 1, 4, 7] = np.nan
    path = tmp_path_factory.mktemp("ocean") / "ocean.nc"
    source.to_netcdf(path, encoding={"sst": {"_FillValue": -9999.0}})
    return path


def run(path, output, **options):
    return preprocess([path], output, Selection(variables=["sst", "w", "tp"]), progress=False, **options)


def test_missing_values_fail_by_default_naming_variable_count_and_first_time(ocean_file, tmp_path):
    with pytest.raises(PreprocessError, match=r"97 missing values \(NaN or fill value\) in 9 fields of the statistics "
                                              r"period: sst at 2020-01-01T00 \(12 points\), sst at 2020-01-01T06 "
                                              r"\(12 points\), .*w850 at 2020-01-02T06 \(1 points\).*--on-nan mask"):
        run(ocean_file, tmp_path / "store.zarr")
    with pytest.raises(PreprocessError, match=r"^1 missing values .* in 1 fields .*: w850 at 2020-01-02T06 "
                                              r"\(1 points\)"):
        run(ocean_file, tmp_path / "store.zarr", on_nan="sst=mask")  # w keeps the default: fail
    assert not (tmp_path / "store.zarr").exists()


def test_fill_and_mask_per_variable(ocean_file, tmp_path):
    summary = run(ocean_file, tmp_path / "store.zarr", on_nan="sst=mask,w=fill")
    assert summary.channels == ["sst", "sst_mask", "tp", "w500", "w850"]
    attrs = StoreAttrs.from_json(dict(zarr.open_group(tmp_path / "store.zarr", mode="r").attrs))
    source = xr.open_dataset(ocean_file)
    sst = expected_field(source, "sst").astype(np.float64)
    land = np.isnan(sst)
    assert land.sum() == N_TIMES * 12
    # statistics leave the missing points out
    np.testing.assert_allclose(attrs.mean[0], np.nanmean(sst), rtol=1e-12)
    np.testing.assert_allclose(attrs.std[0], np.nanstd(sst), rtol=1e-10)
    w850 = expected_field(source, "w")[:, 1].astype(np.float64)
    np.testing.assert_allclose(attrs.mean[4], np.nanmean(w850), rtol=1e-12)
    assert (attrs.mean[1], attrs.std[1]) == (0.0, 1.0)  # the mask channel is seen unscaled

    stored = xr.open_zarr(tmp_path / "store.zarr", consolidated=False)
    np.testing.assert_array_equal(stored["sst"].values[~land], sst[~land].astype(np.float32))
    np.testing.assert_array_equal(stored["sst"].values[land], np.float32(attrs.mean[0]))
    np.testing.assert_array_equal(stored["sst_mask"].values, (~land).astype(np.float32))
    assert stored["w"].sel(level=850).values[5, GRID[0] - 1 - 4, np.argsort(np.mod(source["x"].values, 360))
                                              .tolist().index(7)] == np.float32(attrs.mean[4])
    reader = TileReader(tmp_path / "store.zarr", lat_range=(0, GRID[0]), lon_range=(0, GRID[1]))
    sample = reader.sample(2, lead_steps=0).inputs.numpy()
    np.testing.assert_array_equal(sample[..., 1], (~land[2]).astype(np.float32))  # the model sees the mask
    np.testing.assert_allclose(sample[..., 0][land[2]], 0.0, atol=1e-6)  # filled: normalised channel mean
    assert np.isfinite(sample).all()


def test_policy_errors_name_the_expected_form(ocean_file, tmp_path):
    with pytest.raises(SystemExit, match=r"key on_nan: .*missing-value policy sst=drop: expected one of "
                                         r"\('fail', 'fill', 'mask'\)"):
        cli_main([str(ocean_file), "--output", str(tmp_path / "s.zarr"), "--on-nan", "sst=drop", "--quiet"])
    assert cli_main([str(ocean_file), "--output", str(tmp_path / "s.zarr"), "--on-nan", "mask", "--quiet"]) == 0
    assert StoreAttrs.from_json(dict(zarr.open_group(tmp_path / "s.zarr", mode="r").attrs)).channel_names == [
        "sst", "sst_mask", "tp", "tp_mask", "d2m", "d2m_mask", "w500", "w850", "w_mask500", "w_mask850",
        "r500", "r850", "r_mask500", "r_mask850"]
