"""Ensemble analyses: one member, or every member in a ``member`` dimension with pooled statistics."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from data.combine import Selection
from data.normalize import InputError
from data.preprocess import PreprocessError, preprocess
from data.reader import TileReader
from data.schema import StoreAttrs, StoreError
from launch.preprocess import main as cli_main
from tests.data.reanalysis_files import GRID, expected_field, unusual_dataset

N_TIMES, LABELS = 6, [0, 1, 2]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Three members along a dimension 'ens' that only its standard_name marks as the ensemble axis."""
    members = [unusual_dataset(N_TIMES, seed=label).drop_vars("lsm") for label in LABELS]
    dataset = xr.concat(members, dim="ens").assign_coords(ens=("ens", LABELS, {"standard_name": "realization"}))
    dataset["lsm"] = unusual_dataset(N_TIMES)["lsm"]  # static fields have no members
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.nc"
    dataset.to_netcdf(path)
    return path


def run(path, output, **options):
    return preprocess([path], output, Selection(variables=["sst", "w", "lsm"]), progress=False, **options)


def test_one_member_is_taken_or_a_choice_is_asked_for(ensemble, tmp_path):
    with pytest.raises(InputError, match=r"ensemble dimension 'ens' holds 3 members \[0, 1, 2\]; choose one with "
                                         r"--member N, or keep them all with --members all"):
        run(ensemble, tmp_path / "store.zarr")
    run(ensemble, tmp_path / "store.zarr", member=2)
    source = xr.open_dataset(ensemble).sel(ens=2)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "store.zarr", consolidated=False)["sst"].values,
                                  expected_field(source, "sst"))


def test_all_members_keep_a_member_dimension_with_pooled_statistics(ensemble, tmp_path):
    assert cli_main([str(ensemble), "--output", str(tmp_path / "store.zarr"), "--variables", "sst,w,lsm",
                     "--members", "all", "--quiet"]) == 0
    stored = xr.open_zarr(tmp_path / "store.zarr", consolidated=False)
    source = xr.open_dataset(ensemble)
    assert stored["sst"].dims == ("time", "member", "latitude", "longitude")
    assert stored["w"].dims == ("time", "member", "level", "latitude", "longitude")
    assert stored["lsm"].dims == ("latitude", "longitude")
    assert stored["member"].values.tolist() == LABELS
    assert zarr.open_group(tmp_path / "store.zarr")["sst"].chunks == (1, 1, *GRID)
    sst = expected_field(source, "sst")  # (ens, time, lat, lon)
    np.testing.assert_array_equal(stored["sst"].values, sst.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(stored["w"].sel(level=850).values,
                                  expected_field(source, "w")[:, :, 1].transpose(1, 0, 2, 3))
    attrs = StoreAttrs.from_json(dict(zarr.open_group(tmp_path / "store.zarr", mode="r").attrs))
    assert attrs.members == LABELS and attrs.channel_names == ["sst", "w500", "w850"]
    values = sst.astype(np.float64)
    np.testing.assert_allclose(attrs.mean[0], values.mean(), rtol=1e-12)
    np.testing.assert_allclose(attrs.std[0], values.std(), rtol=1e-10)
    np.testing.assert_allclose(attrs.tendency_std[0], np.diff(values, axis=1).std(), rtol=1e-10)  # per member
    with pytest.raises(StoreError, match=r"an ensemble store of 3 members .*preprocess with --member N"):
        TileReader(tmp_path / "store.zarr", lat_range=(0, GRID[0]), lon_range=(0, GRID[1]))
    reader = TileReader(tmp_path / "store.zarr", lat_range=(0, GRID[0]), lon_range=(0, GRID[1]), member=0,
                        normalize=False)
    for k in (0, 2):  # one reader, any member: an ensemble forecast's initial conditions
        reader.use_member(k)
        sample = reader.sample(2, lead_steps=1)
        np.testing.assert_array_equal(sample.inputs[..., 0].numpy(), stored["sst"].values[2, k])
        np.testing.assert_array_equal(sample.targets[0, ..., 1].numpy(), stored["w"].sel(level=500).values[3, k])
    with pytest.raises(StoreError, match=r"expected a member index 0..2"):
        reader.use_member(3)


def test_all_members_of_inputs_without_members_are_refused(tmp_path):
    unusual_dataset(N_TIMES).to_netcdf(tmp_path / "one.nc")
    with pytest.raises(PreprocessError, match=r"--members all: no input has an ensemble member axis"):
        run(tmp_path / "one.nc", tmp_path / "store.zarr", member="all")
