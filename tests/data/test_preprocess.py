"""Preprocessing end to end: synthetic netCDF -> store -> TileReader, resumability, append, bad inputs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dask
import netCDF4
import numpy as np
import pytest
import xarray as xr
import zarr
import zarr.storage._local

import data.preprocess as preprocess_module
from data.combine import Selection
from data.normalize import InputError
from data.preprocess import PreprocessError, preprocess
from data.reader import ChunkAlignmentWarning, TileReader
from data.schema import StoreAttrs, StoreError
from data.synthetic import generate
from launch.preprocess import main as cli_main

REPOSITORY = Path(__file__).resolve().parents[2]
GRID, LEVELS, STEPS = (9, 16), (500, 850), 12
SELECTION = Selection(surface=["msl", "u10", "v10", "t2m"], upper_air=["z", "t", "u", "v", "q"],
                      static=["lsm", "orography"], levels=list(LEVELS))
PRESSURE, SINGLE, STATIC = "era5_pressure_levels_2020-01.nc", "era5_single_levels_2020-01.nc", "era5_static.nc"


def run(inputs, output, **options):
    options = {"selection": SELECTION, "batch_size": 4, "progress": False, **options}
    return preprocess([inputs] if isinstance(inputs, (str, Path)) else inputs, output, options.pop("selection"),
                      **options)


def source_fields(folder: Path) -> dict[str, np.ndarray]:
    """Channel name -> (time, lat, lon) float32 straight from the netCDF files, latitude ascending."""
    fields = {}
    with xr.open_dataset(folder / SINGLE) as single, xr.open_dataset(folder / PRESSURE) as pressure:
        for name in SELECTION.surface:
            fields[name] = single[name].values[:, ::-1]
        for name in SELECTION.upper_air:
            for level in LEVELS:
                fields[f"{name}{level}"] = pressure[name].sel(level=level).values[:, ::-1]
    return fields


def store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def copy_inputs(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def rewrite(path: Path, change) -> None:
    """Load a netCDF file undecoded, apply ``change(dataset) -> dataset`` and write it back."""
    dataset = xr.load_dataset(path, decode_times=False)
    change(dataset).to_netcdf(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("netcdf")
    generate(folder, grid=GRID, levels=LEVELS, steps=STEPS)
    return folder


@pytest.fixture(scope="module")
def clean_store(inputs, tmp_path_factory) -> Path:
    """An uninterrupted run, tile grid 1x2, batches of 4 steps (3 batches)."""
    output = tmp_path_factory.mktemp("clean") / "store.zarr"
    summary = run(inputs, output, tile_grid=(1, 2))
    assert summary.batches_written == 3 and summary.batches_skipped == 0
    return output


# ------------------------------------------------------------------------ values, statistics, chunks
def test_tile_reader_reads_the_normalised_source(inputs, clean_store):
    source = source_fields(inputs)
    attrs = StoreAttrs.from_json(dict(zarr.open_group(clean_store, mode="r").attrs))
    assert attrs.complete and attrs.channel_names == list(source)
    stored = xr.open_zarr(clean_store, consolidated=False)
    for name, values in source.items():  # raw store values: bit-identical to the source
        channel = attrs.channels[attrs.channel_names.index(name)]
        field = stored[channel.variable] if channel.level is None else stored[channel.variable].sel(level=channel.level)
        np.testing.assert_array_equal(field.values, values, err_msg=name)
    for columns in ((0, 8), (8, 16)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ChunkAlignmentWarning)
            reader = TileReader(clean_store, lat_range=(0, GRID[0]), lon_range=columns)
        sample = reader.sample(3, lead_steps=2)
        expected = np.stack([(source[n][3:6, :, slice(*columns)] - attrs.mean[i]) / attrs.std[i]
                             for i, n in enumerate(attrs.channel_names)], axis=-1)
        np.testing.assert_allclose(sample.inputs.numpy(), expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sample.targets.numpy(), expected[1:], rtol=1e-5, atol=1e-5)
    with xr.open_dataset(inputs / STATIC) as static:
        orography = static["z"].values[0, ::-1]
    np.testing.assert_array_equal(stored["orography"].values, orography)
    np.testing.assert_allclose(reader.static()[..., 1].numpy(),
                               (orography[:, 8:] - attrs.static_mean[1]) / attrs.static_std[1], rtol=1e-5, atol=1e-5)


def test_statistics_equal_numpy_on_the_source(inputs, clean_store):
    attrs = StoreAttrs.from_json(dict(zarr.open_group(clean_store, mode="r").attrs))
    for i, (name, values) in enumerate(source_fields(inputs).items()):
        values = values.astype(np.float64)
        np.testing.assert_allclose(attrs.mean[i], values.mean(), rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(attrs.std[i], values.std(), rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(attrs.tendency_std[i], np.diff(values, axis=0).std(), rtol=1e-10, err_msg=name)
    assert attrs.statistics_period == ("2020-01-01T00:00:00", "2020-01-03T18:00:00")
    assert [source["path"] for source in attrs.sources] == [str(inputs / n) for n in (PRESSURE, SINGLE, STATIC)]
    assert all(len(source["sha256"]) == 64 and source["size"] > 0 for source in attrs.sources)


def test_statistics_period_restricts_the_statistics(inputs, tmp_path):
    summary = run(inputs, tmp_path / "store.zarr", statistics_period=("2020-01-02", "2020-01-02"))
    attrs = StoreAttrs.from_json(dict(zarr.open_group(tmp_path / "store.zarr", mode="r").attrs))
    t2m = source_fields(inputs)["t2m"][4:8].astype(np.float64)  # the four steps of 2 January
    assert attrs.statistics_period == ("2020-01-02T00:00:00", "2020-01-02T18:00:00") == summary.statistics_period
    np.testing.assert_allclose(attrs.mean[3], t2m.mean(), rtol=1e-12)
    np.testing.assert_allclose(attrs.tendency_std[3], np.diff(t2m, axis=0).std(), rtol=1e-10)
    assert summary.n_times == STEPS  # the data still covers every time


@pytest.mark.parametrize("tile_grid", [(2, 3), (3, 4)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_chunks_are_one_tile(inputs, tmp_path, tile_grid):
    """Chunk rows round down (models crop the rows that do not divide), so every tile of the
    cropped grid is exactly one chunk per variable."""
    run(inputs, tmp_path / "store.zarr", tile_grid=tile_grid, batch_size=12)
    group = zarr.open_group(tmp_path / "store.zarr", mode="r")
    rows, columns = GRID[0] // tile_grid[0], -(-GRID[1] // tile_grid[1])
    assert group["t"].chunks == (1, 1, rows, columns)
    assert group["t2m"].chunks == (1, rows, columns)
    assert group["lsm"].chunks == (rows, columns)
    assert group.attrs["tile_grid"] == list(tile_grid)
    for name in ("t", "t2m", "lsm"):  # the contract's codec: Blosc lz4 + byte shuffle
        (codec,) = group[name].compressors
        assert (codec.cname.value, codec.shuffle.value, codec.typesize) == ("lz4", "shuffle", 4), codec
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChunkAlignmentWarning)
        for k in range(tile_grid[0]):  # every latitude tile of the model grid (rows x tiles rows)
            reader = TileReader(tmp_path / "store.zarr", lat_range=(k * rows, (k + 1) * rows),
                                lon_range=(0, columns), model_lat=rows * tile_grid[0])
            assert reader.alignment.aligned


def test_tile_grid_larger_than_the_grid_is_refused(inputs, tmp_path):
    with pytest.raises(PreprocessError, match=r"tile grid 1x17: 17 tiles along longitude, expected 1..16"):
        run(inputs, tmp_path / "store.zarr", tile_grid=(1, 17))


# ------------------------------------------------------------------------ resumability
class Killed(Exception):
    """Stands for the run being killed."""


def kill_after(n_batches: int):
    def after_batch(index: int) -> None:
        if index + 1 == n_batches:
            raise Killed(f"killed after batch {index}")
    return after_batch


@pytest.mark.parametrize("finished", [0, 2])
def test_killed_run_resumes_to_the_bytes_of_a_clean_run(inputs, clean_store, tmp_path, monkeypatch, finished):
    output = tmp_path / "store.zarr"
    with monkeypatch.context() as patch:
        if finished == 0:  # killed after the skeleton, before any batch
            patch.setattr(preprocess_module, "_write_batches", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            run(inputs, output, tile_grid=(1, 2), after_batch=kill_after(finished))
    with pytest.raises(StoreError, match="incomplete"):
        TileReader(output, lat_range=(0, GRID[0]), lon_range=(0, 8))
    assert (tmp_path / "store.zarr.progress").is_dir()

    summary = run(inputs, output, tile_grid=(1, 2))
    assert (summary.batches_written, summary.batches_skipped) == (3 - finished, finished)
    assert not (tmp_path / "store.zarr.progress").exists()
    assert store_files(output) == store_files(clean_store)


def full_disk_at(marker: str):
    """zarr's file write raising ENOSPC for keys containing ``marker``, as a full disk does."""
    original = zarr.storage._local._put

    def put(path, value, exclusive=False):
        if marker in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive)
    return put


@pytest.mark.parametrize("marker, what", [("t2m/c/5/", r"batch 1 \(times 2020-01-02T00:00:00..2020-01-02T18:00:00\)"),
                                          ("lsm/c/", r"the store's skeleton \(metadata, coordinates, static fields\)")],
                         ids=["batch", "skeleton"])
def test_a_full_disk_stops_with_one_message_and_a_rerun_completes(inputs, clean_store, tmp_path, monkeypatch,
                                                                  marker, what):
    output = tmp_path / "store.zarr"
    with monkeypatch.context() as patch:
        patch.setattr(zarr.storage._local, "_put", full_disk_at(marker))
        with pytest.raises(PreprocessError, match=rf"^{output}: no space left on the device \(No space left on "
                                                  rf"device\) while writing {what}; the rest of the store needs up "
                                                  rf"to \d+\.\d\d GiB .* GiB are free on .*rerun the same command"):
            run(inputs, output, tile_grid=(1, 2))
    summary = run(inputs, output, tile_grid=(1, 2))  # space freed: the same command finishes the store
    assert summary.batches_written + summary.batches_skipped == 3
    assert store_files(output) == store_files(clean_store)


def test_killed_run_does_not_redo_finished_batches(inputs, tmp_path, monkeypatch):
    output = tmp_path / "store.zarr"
    with pytest.raises(Killed):
        run(inputs, output, after_batch=kill_after(2))
    regions = []
    original = xr.Dataset.to_zarr

    def recording_to_zarr(dataset, *args, **kwargs):
        regions.append(kwargs.get("region"))
        return original(dataset, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", recording_to_zarr)
    assert run(inputs, output).batches_written == 1
    assert regions == [{"time": slice(8, 12)}]  # no skeleton rewrite, only the unfinished batch


def test_restart_with_a_different_selection_is_refused(inputs, tmp_path):
    output = tmp_path / "store.zarr"
    with pytest.raises(Killed):
        run(inputs, output, after_batch=kill_after(1))
    with pytest.raises(PreprocessError, match=r"unfinished run with different \['selection'\]"):
        run(inputs, output, selection=Selection(**{**SELECTION.__dict__, "levels": [500]}))
    with pytest.raises(PreprocessError, match=r"different \['tile_grid'\]"):
        run(inputs, output, tile_grid=(3, 1))
    run(inputs, output, tile_grid=(3, 1), overwrite=True)
    assert zarr.open_group(output, mode="r").attrs["complete"] is True


def test_rerun_of_a_finished_store_writes_nothing_and_other_runs_are_refused(inputs, clean_store, tmp_path):
    before = store_files(clean_store)
    summary = run(inputs, clean_store, tile_grid=(1, 2))
    assert (summary.batches_written, summary.batches_skipped) == (0, 3)
    assert store_files(clean_store) == before
    with pytest.raises(PreprocessError, match="exists and is not a store this run is resuming.*--overwrite"):
        run(inputs, clean_store, tile_grid=(1, 1))


# ------------------------------------------------------------------------ schedulers
def test_dask_distributed_clusters_write_the_bytes_of_the_threaded_run(inputs, clean_store, tmp_path):
    """A local cluster the run starts, and an existing cluster reached at its tcp:// address."""
    from distributed import LocalCluster

    run(inputs, tmp_path / "local.zarr", tile_grid=(1, 2), scheduler="local", workers=2)
    assert store_files(tmp_path / "local.zarr") == store_files(clean_store)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        run(inputs, tmp_path / "tcp.zarr", tile_grid=(1, 2), scheduler=cluster.scheduler_address)
    assert store_files(tmp_path / "tcp.zarr") == store_files(clean_store)


def test_an_unreachable_scheduler_is_named(inputs, tmp_path):
    from tests.distributed import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(PreprocessError, match=rf"--scheduler {address}: cannot connect to a dask scheduler there"):
        run(inputs, tmp_path / "store.zarr", scheduler=address, workers=1)


# ------------------------------------------------------------------------ append
def test_append_continues_the_time_axis_and_keeps_the_statistics(inputs, tmp_path):
    first_half = Selection(**{**SELECTION.__dict__, "end": np.datetime64("2020-01-02T06:00")})  # 6 steps
    output = tmp_path / "store.zarr"
    run(inputs, output, selection=first_half)
    attrs_before = dict(zarr.open_group(output, mode="r").attrs)
    summary = run(inputs, output, append=True)
    assert (summary.n_times, summary.batches_written) == (STEPS, 2)
    attrs = dict(zarr.open_group(output, mode="r").attrs)
    for key in ("mean", "std", "tendency_std", "static_mean", "static_std", "statistics_period"):
        assert attrs[key] == attrs_before[key]
    assert [entry["run"]["kind"] for entry in attrs["preprocess"]] == ["create", "append"]
    whole = run(inputs, tmp_path / "whole.zarr", statistics_period=("2020-01-01", "2020-01-02T06:00"))
    appended, reference = (xr.open_zarr(p, consolidated=False).load() for p in (output, whole.store))
    xr.testing.assert_identical(appended.drop_attrs(), reference.drop_attrs())
    reader = TileReader(output, lat_range=(0, GRID[0]), lon_range=(0, GRID[1]))
    assert reader.times.size == STEPS and reader.sample(5, lead_steps=2).targets.shape[0] == 2

    with pytest.raises(InputError, match="no input times within"):  # nothing after the store's last time
        run(inputs, output, append=True)


def test_append_refuses_a_gap_other_channels_or_changed_statistics(inputs, tmp_path):
    output = tmp_path / "store.zarr"
    run(inputs, output, selection=Selection(**{**SELECTION.__dict__, "end": np.datetime64("2020-01-02")}))
    with pytest.raises(PreprocessError, match="must continue regularly at 2020-01-02T06"):
        run(inputs, output, append=True, selection=Selection(**{**SELECTION.__dict__,
                                                                "start": np.datetime64("2020-01-02T12")}))
    with pytest.raises(PreprocessError, match=r"channels \[.*\] differ from the store's"):
        run(inputs, output, append=True, selection=Selection(**{**SELECTION.__dict__, "levels": [850]}))
    with pytest.raises(PreprocessError, match="--recompute-statistics"):
        run(inputs, output, append=True, statistics_period=("2020-01-01", "2020-01-03"))
    summary = run(inputs, output, append=True, recompute_statistics=True,
                  statistics_period=("2020-01-01", "2020-01-03"))
    t2m = source_fields(inputs)["t2m"].astype(np.float64)
    attrs = StoreAttrs.from_json(dict(zarr.open_group(output, mode="r").attrs))
    np.testing.assert_allclose(attrs.mean[3], t2m.mean(), rtol=1e-12)
    np.testing.assert_allclose(attrs.tendency_std[3], np.diff(t2m, axis=0).std(), rtol=1e-10)
    assert summary.statistics_period == ("2020-01-01T00:00:00", "2020-01-03T18:00:00")


# ------------------------------------------------------------------------ bad inputs
def _drop_level(dataset):
    return dataset.isel(level=[0])


def _shift_longitude(dataset):
    return dataset.assign_coords(longitude=dataset["longitude"] + 1.0)


def _repeat_time(dataset):
    return dataset.isel(time=[0, 1, 1, 2])


def _reverse_time(dataset):
    return dataset.isel(time=[0, 2, 1, 3])


def _calendar(dataset):
    dataset["time"].attrs.update(calendar="360_day", units="hours since 2020-02-29 00:00:00")
    dataset["time"] = dataset["time"] - dataset["time"][0]  # 2020-02-29, ..., then 2020-02-30
    return dataset


def _units(dataset):
    dataset["time"].attrs["units"] = "hours after 1900-01-01"
    return dataset


@pytest.mark.parametrize("file, change, message", [
    (SINGLE, lambda d: d.drop_vars("t2m"), r"variables \['t2m'\] not found in any input"),
    (PRESSURE, _drop_level, rf"{PRESSURE}: variable 'z' lacks pressure levels \[850\] hPa"),
    (SINGLE, _shift_longitude, rf"{SINGLE}: grid 9x16 .* differs from the grid .* expected all inputs on one grid"),
    (SINGLE, _repeat_time, rf"{SINGLE}: time 2020-01-01T06:00:00.* \(index 1\) is repeated"),
    (SINGLE, _reverse_time, rf"{SINGLE}: time .* is followed by the earlier .*expected strictly ascending"),
    (SINGLE, _calendar, rf"{SINGLE}: time coordinate 'time' uses calendar '360_day', and its date "
                        r"2020-02-30T00:00:00 \(index 4\) exists in no real calendar; convert it"),
    (SINGLE, _units, rf"{SINGLE}: time coordinate 'time' has units 'hours after 1900-01-01'"),
], ids=["missing-variable", "missing-level", "other-grid", "repeated-time", "descending-time", "calendar",
        "time-units"])
def test_bad_inputs_are_refused_naming_file_and_variable(inputs, tmp_path, file, change, message):
    folder = copy_inputs(inputs, tmp_path / "inputs")
    rewrite(folder / file, change)
    with pytest.raises(InputError, match=message):
        run(folder, tmp_path / "store.zarr")
    assert not (tmp_path / "store.zarr").exists()


def test_truncated_files_are_refused(inputs, tmp_path):
    folder = copy_inputs(inputs, tmp_path / "inputs")
    path = folder / PRESSURE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"{PRESSURE}: cannot read this file as netcdf .* truncated or corrupt"):
        run(folder, tmp_path / "store.zarr")

    classic = folder / SINGLE
    xr.load_dataset(classic, decode_times=False).to_netcdf(classic, format="NETCDF3_64BIT")
    classic.write_bytes(classic.read_bytes()[:-1000])
    with pytest.raises(InputError, match=rf"{SINGLE}: netCDF3 file is truncated: \d+ bytes, its header describes"):
        run([classic], tmp_path / "store.zarr")


def test_ensemble_member_is_chosen_or_refused(inputs, tmp_path):
    folder = copy_inputs(inputs, tmp_path / "inputs")
    single = xr.load_dataset(folder / SINGLE, decode_times=False)
    members = xr.concat([single, single + 1.0], dim="number").assign_coords(number=[0, 1])
    members.to_netcdf(folder / SINGLE)
    with pytest.raises(InputError, match=rf"{SINGLE}: ensemble dimension 'number' holds 2 members \[0, 1\]; "
                                         r"choose one with --member N"):
        run(folder, tmp_path / "store.zarr")
    with pytest.raises(InputError, match=r"ensemble member 5 requested, but 'number' holds members \[0, 1\]"):
        run(folder, tmp_path / "store.zarr", member=5)
    run(folder, tmp_path / "store.zarr", member=1)
    stored = xr.open_zarr(tmp_path / "store.zarr", consolidated=False)
    np.testing.assert_array_equal(stored["t2m"].values, source_fields(inputs)["t2m"] + 1.0)


# ------------------------------------------------------------------------ missing values
@pytest.fixture()
def inputs_with_missing_values(inputs, tmp_path) -> Path:
    """t2m NaN at 3 points of step 2 (12 UTC), t850 a declared missing value at 1 point of step 9."""
    folder = copy_inputs(inputs, tmp_path / "inputs")
    with netCDF4.Dataset(folder / SINGLE, "a") as single:
        values = single["t2m"][2]
        values[0, :3] = np.nan
        single["t2m"][2] = values
    with netCDF4.Dataset(folder / PRESSURE, "a") as pressure:
        pressure["t"].setncattr("missing_value", np.float32(-32767.0))  # decodes to NaN
        values = pressure["t"][9, 1]
        values[4, 5] = -32767.0
        pressure["t"][9, 1] = values
    return folder


def test_missing_values_fail_by_default_naming_variable_level_and_time(inputs_with_missing_values, tmp_path):
    with pytest.raises(PreprocessError, match=r"4 missing values \(NaN or fill value\) in 2 fields of the statistics "
                                              r"period: t2m at 2020-01-01T12 \(3 points\), t850 at 2020-01-03T06 "
                                              r"\(1 points\).*--on-nan fill"):
        run(inputs_with_missing_values, tmp_path / "store.zarr")
    assert not (tmp_path / "store.zarr").exists()


def test_missing_values_are_filled_with_the_channel_mean_and_reported(inputs, inputs_with_missing_values, tmp_path):
    summary = run(inputs_with_missing_values, tmp_path / "store.zarr", on_nan="fill")
    assert [(m.channel, str(m.time)[:13], m.count) for m in summary.missing] == [
        ("t2m", "2020-01-01T12", 3), ("t850", "2020-01-03T06", 1)]
    assert "missing    4 values in 2 fields, filled with the channel mean" in summary.describe()
    attrs = StoreAttrs.from_json(dict(zarr.open_group(tmp_path / "store.zarr", mode="r").attrs))
    t2m_source = source_fields(inputs)["t2m"].astype(np.float64)
    t2m_source[2, -1, :3] = np.nan  # latitude is flipped in the store
    np.testing.assert_allclose(attrs.mean[3], np.nanmean(t2m_source), rtol=1e-12)
    np.testing.assert_allclose(attrs.std[3], np.nanstd(t2m_source), rtol=1e-10)
    reader = TileReader(tmp_path / "store.zarr", lat_range=(0, GRID[0]), lon_range=(0, GRID[1]))
    sample = reader.sample(2, lead_steps=0)
    np.testing.assert_allclose(sample.inputs[-1, :3, 3].numpy(), 0.0, atol=1e-6)  # normalised channel mean
    assert np.isfinite(sample.inputs.numpy()).all()
    assert attrs.complete and zarr.open_group(tmp_path / "store.zarr").attrs["preprocess"][-1]["missing_values"] == 4


# ------------------------------------------------------------------------ command line
def test_command_line_writes_a_store_the_reader_opens(inputs, tmp_path):
    output = tmp_path / "demo.zarr"
    finished = subprocess.run(
        [sys.executable, "launch/preprocess.py", str(inputs), "--output", str(output), "--config",
         "configs/data/demo.yaml", "--tile-grid", "1x2", "--batch-size", "6"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"wrote {output}" in finished.stdout
    assert "channels   14: msl u10 v10 t2m z500 z850 t500 t850 u500 u850 v500 v850 q500 q850" in finished.stdout
    assert "chunks time=1 level=1 latitude=9 longitude=8" in finished.stdout
    assert "writing demo.zarr" in finished.stderr  # the progress bar
    reader = TileReader(output, lat_range=(0, GRID[0]), lon_range=(8, 16))
    assert reader.static_names == ["lsm", "orography"] and reader.times.size == STEPS


def test_command_line_errors_name_the_config_key(inputs, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("levels: [500, high]\n")
    with pytest.raises(SystemExit, match=r"key levels.1: Input should be a valid integer"):
        cli_main([str(inputs), "--output", str(tmp_path / "s.zarr"), "--config", str(config)])
    config.write_text("levels: [500]\nsurface: [t2m, sst]\n")  # an open vocabulary: refused by the inputs
    assert cli_main([str(inputs), "--output", str(tmp_path / "s.zarr"), "--config", str(config), "--quiet"]) == 1
    assert "variables ['sst'] not found in any input" in capsys.readouterr().err
    config.write_text("levels: [500]\ntile_grids: [1, 2]\n")
    with pytest.raises(SystemExit, match=r"key tile_grids: Extra inputs are not permitted"):
        cli_main([str(inputs), "--output", str(tmp_path / "s.zarr"), "--config", str(config)])
    assert cli_main([str(inputs), "--output", str(tmp_path / "s.zarr"), "--config", "configs/data/demo.yaml",
                     "--upper-air", "none", "--start", "2020-01-03", "--quiet"]) == 0
    assert "time       2020-01-03T00:00:00 .. 2020-01-03T18:00:00, 4 steps of 6 h" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "nothing*.nc"), "--output", str(tmp_path / "t.zarr"), "--config",
                     "configs/data/demo.yaml", "--quiet"]) == 1
    assert "input pattern" in capsys.readouterr().err


def test_zarr_inputs_with_weatherbench_names_and_a_coarser_time_step(inputs, tmp_path):
    """A WeatherBench2-style zarr input (long names, latitude ascending), subsampled to 12 h, default batches."""
    names = {"msl": "mean_sea_level_pressure", "u10": "10m_u_component_of_wind", "v10": "10m_v_component_of_wind",
             "t2m": "2m_temperature", "z": "geopotential", "t": "temperature", "u": "u_component_of_wind",
             "v": "v_component_of_wind", "q": "specific_humidity"}
    dynamic = xr.merge([xr.open_dataset(inputs / SINGLE), xr.open_dataset(inputs / PRESSURE)])
    dynamic.rename(names).sortby("latitude").to_zarr(tmp_path / "wb2.zarr", zarr_format=3, consolidated=False)
    twelve_hourly = Selection(**{**SELECTION.__dict__, "time_step_hours": 12})
    summary = preprocess([tmp_path / "wb2.zarr", inputs / STATIC], tmp_path / "store.zarr", twelve_hourly,
                         progress=False)
    assert (summary.n_times, summary.time_step_hours) == (STEPS // 2, 12)
    stored = xr.open_zarr(tmp_path / "store.zarr", consolidated=False)
    np.testing.assert_array_equal(stored["t2m"].values, source_fields(inputs)["t2m"][::2])
    np.testing.assert_array_equal(stored["q"].sel(level=500).values, source_fields(inputs)["q500"][::2])
    assert TileReader(tmp_path / "store.zarr", lat_range=(0, 9), lon_range=(0, 16)).step_hours == 12
