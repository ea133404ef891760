"""TileReader: reads exactly its tile's chunks, and the values equal a naive xarray read."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import xarray as xr

from data.reader import ChunkAlignmentWarning, TileReader
from data.schema import StoreError
from data.time_features import time_features
from tests.data.store_fixtures import ReadRecorder, chunk_keys, write_store

N_LAT, N_LON = 8, 12


def tiles(tile_grid: tuple[int, int], n_lat: int = N_LAT, n_lon: int = N_LON):
    """Row and column ranges of every tile of an even tile grid."""
    rows, columns = n_lat // tile_grid[0], n_lon // tile_grid[1]
    return [((i * rows, (i + 1) * rows), (j * columns, (j + 1) * columns))
            for i in range(tile_grid[0]) for j in range(tile_grid[1])]


def naive_fields(path, reader: TileReader, time_indices, rows, columns) -> np.ndarray:
    """``(time, lat, lon, C)`` normalised, read with xarray the obvious way."""
    dataset = xr.open_zarr(path, consolidated=False)
    fields = []
    for index in reader.channel_indices:
        channel = reader.attrs.channels[index]
        values = dataset[channel.variable]
        if channel.level is not None:
            values = values.sel(level=channel.level)
        values = values.isel(time=list(time_indices), latitude=slice(*rows), longitude=slice(*columns))
        fields.append((values.values.astype(np.float64) - reader.attrs.mean[index]) / reader.attrs.std[index])
    return np.stack(fields, axis=-1)


def expected_keys(reader: TileReader, time_indices, rows, columns, spatial_chunks) -> set[str]:
    levels = list(xr.open_zarr(reader.store, consolidated=False).level.values)
    keys = set()
    for index in reader.channel_indices:
        channel = reader.attrs.channels[index]
        level = None if channel.level is None else [levels.index(channel.level)]
        keys |= chunk_keys(channel.variable, rows, columns, spatial_chunks, time_indices, level)
    return keys


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One compressed and one raw store per tile grid (written once for the module)."""
    root = tmp_path_factory.mktemp("stores")
    return {(grid, compressed): write_store(root / f"{grid[0]}x{grid[1]}-{compressed}.zarr", tile_grid=grid,
                                            compressed=compressed)
            for grid in [(1, 1), (2, 1), (1, 2), (2, 2)] for compressed in (True, False)}


@pytest.mark.parametrize("compressed", [True, False], ids=["zstd", "raw"])
@pytest.mark.parametrize("tile_grid", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_each_tile_reads_exactly_its_chunks_and_values_match_xarray(stores, tile_grid, compressed):
    path = stores[(tile_grid, compressed)]
    spatial_chunks = (N_LAT // tile_grid[0], N_LON // tile_grid[1])
    time_index, lead_steps = 1, 2
    all_keys = set()
    for rows, columns in tiles(tile_grid):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ChunkAlignmentWarning)
            reader = TileReader(path, lat_range=rows, lon_range=columns)
        assert reader.alignment.aligned and reader.alignment.wasted_fraction == 0.0
        with ReadRecorder() as recorder:
            sample = reader.sample(time_index, lead_steps)
        window = range(time_index, time_index + lead_steps + 1)
        keys = expected_keys(reader, window, rows, columns, spatial_chunks)
        assert recorder.keys == keys
        assert len(recorder.reads) == len(keys)  # no chunk read twice
        tile_bytes = 4 * (rows[1] - rows[0]) * (columns[1] - columns[0]) * reader.n_channels * len(window)
        if not compressed:
            assert recorder.n_bytes == tile_bytes
        all_keys |= keys

        expected = naive_fields(path, reader, window, rows, columns)
        np.testing.assert_allclose(sample.inputs.numpy(), expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sample.targets.numpy(), expected[1:], rtol=1e-5, atol=1e-5)
        assert sample.inputs.shape == (rows[1] - rows[0], columns[1] - columns[0], 8)
        assert sample.targets.shape == (lead_steps, *sample.inputs.shape)
        assert sample.time == reader.times[time_index] and sample.time_index == time_index
    # the tiles together read each chunk of the window once: a partition, not overlapping reads
    everything = expected_keys(reader, window, (0, N_LAT), (0, N_LON), spatial_chunks)
    assert all_keys == everything


def test_channel_slices_read_only_their_channels(stores):
    path = stores[((2, 2), False)]
    rows, columns = (4, 8), (0, 6)
    reader = TileReader(path, lat_range=rows, lon_range=columns)
    names = reader.channel_names  # msl t2m z500 z850 z1000 t500 t850 t1000
    for channels in ([0, 1, 2, 3], [4, 5, 6, 7], [1], [7, 4, 2], [2, 4]):
        sliced = TileReader(path, lat_range=rows, lon_range=columns, channels=channels)
        assert sliced.channel_names == [names[i] for i in channels]
        with ReadRecorder() as recorder:
            sample = sliced.sample(2, lead_steps=1)
        assert recorder.keys == expected_keys(sliced, [2, 3], rows, columns, (4, 6))
        assert recorder.n_bytes == 4 * 4 * 6 * len(channels) * 2
        expected = naive_fields(path, sliced, [2, 3], rows, columns)
        np.testing.assert_allclose(sample.inputs.numpy(), expected[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sample.targets.numpy(), expected[1:], rtol=1e-5, atol=1e-5)


def test_static_fields_read_once_from_the_tile(stores):
    path = stores[((2, 2), False)]
    rows, columns = (0, 4), (6, 12)
    with ReadRecorder() as recorder:
        reader = TileReader(path, lat_range=rows, lon_range=columns, static_channels=[1])
    static_reads = {key for key in recorder.keys if key.startswith(("lsm/c/", "orography/c/"))}
    assert static_reads == chunk_keys("orography", rows, columns, (4, 6)) == {"orography/c/0/1"}
    dataset = xr.open_zarr(path, consolidated=False)
    expected = ((dataset.orography.isel(latitude=slice(*rows), longitude=slice(*columns)).values
                 - reader.attrs.static_mean[1]) / reader.attrs.static_std[1])
    np.testing.assert_allclose(reader.static().numpy()[..., 0], expected, rtol=1e-5, atol=1e-5)
    with ReadRecorder() as recorder:
        sample = reader.sample(0)
    assert not any(key.startswith(("lsm/", "orography/")) for key in recorder.keys)
    assert sample.static is reader.static() and sample.static.shape == (4, 6, 1)


def test_forcings_are_time_features_of_each_window_time_on_the_tile(stores):
    path = stores[((2, 2), True)]
    reader = TileReader(path, lat_range=(4, 8), lon_range=(6, 12))
    sample = reader.sample(0, lead_steps=3)
    assert sample.forcings.shape == (4, 4, 6, 4)
    longitudes = np.arange(6, 12) * 30.0
    for k in range(4):
        np.testing.assert_array_equal(sample.forcings[k].numpy(), time_features(reader.times[k], longitudes, 4))


def test_reads_from_inside_a_running_event_loop(stores):
    """A notebook runs an event loop in the caller's thread; the reader must still work there."""
    import asyncio

    reader = TileReader(stores[((1, 1), True)], lat_range=(0, 8), lon_range=(0, 12))
    expected = reader.sample(1, lead_steps=1)

    async def read():
        return reader.sample(1, lead_steps=1)

    sample = asyncio.run(read())
    torch.testing.assert_close(sample.inputs, expected.inputs, rtol=0, atol=0)
    torch.testing.assert_close(sample.targets, expected.targets, rtol=0, atol=0)


def test_lead_zero_gives_inputs_only_and_dtype_is_applied(stores):
    reader = TileReader(stores[((1, 1), True)], lat_range=(0, 8), lon_range=(0, 12), dtype=torch.bfloat16)
    sample = reader.sample(3, lead_steps=0)
    assert sample.targets.shape == (0, 8, 12, 8) and sample.forcings.shape == (1, 8, 12, 4)
    assert sample.inputs.dtype == sample.targets.dtype == sample.static.dtype == torch.bfloat16
    float_reader = TileReader(stores[((1, 1), True)], lat_range=(0, 8), lon_range=(0, 12))
    torch.testing.assert_close(sample.inputs.float(), float_reader.sample(3, 0).inputs, rtol=1e-2, atol=1e-2)


def test_model_grid_crops_the_last_store_rows(tmp_path):
    # 9 stored rows (like 721), model grid of 8 (like 720), chunks of 4 rows: tiles align, row 8 never read
    path = write_store(tmp_path / "s.zarr", n_lat=9, spatial_chunks=(4, 6), compressed=False)
    seen = set()
    for rows in [(0, 4), (4, 8)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ChunkAlignmentWarning)
            reader = TileReader(path, lat_range=rows, lon_range=(0, 12), model_lat=8)
        with ReadRecorder() as recorder:
            sample = reader.sample(0)
        seen |= recorder.keys
        assert sample.inputs.shape == (4, 12, 8)
        np.testing.assert_allclose(sample.inputs.numpy(), naive_fields(path, reader, [0], rows, (0, 12))[0],
                                   rtol=1e-5, atol=1e-5)
    assert not any(key.split("/")[-2] == "2" for key in seen)  # chunk row 2 holds only the cropped row
    with pytest.raises(ValueError, match=r"lat_range=\(4, 9\).*model_lat"):
        TileReader(path, lat_range=(4, 9), lon_range=(0, 12), model_lat=8)


def test_model_grid_pads_rows_beyond_the_store_with_zeros(tmp_path):
    path = write_store(tmp_path / "s.zarr", n_lat=7, spatial_chunks=(4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChunkAlignmentWarning)  # the stored rows are the edge chunk's valid rows
        reader = TileReader(path, lat_range=(4, 8), lon_range=(0, 6), model_lat=8)
    sample = reader.sample(1)
    assert sample.inputs.shape == (4, 6, 8) and sample.static.shape == (4, 6, 2)
    np.testing.assert_allclose(sample.inputs.numpy()[:3], naive_fields(path, reader, [1], (4, 7), (0, 6))[0],
                               rtol=1e-5, atol=1e-5)
    for tensor in (sample.inputs, sample.targets[0], sample.static, sample.forcings[0], sample.forcings[1]):
        assert torch.count_nonzero(tensor[3]) == 0
        assert torch.count_nonzero(tensor[:3]) > 0
    padding_only = TileReader(path, lat_range=(7, 8), lon_range=(0, 6), model_lat=8)
    assert torch.count_nonzero(padding_only.sample(0).inputs) == 0


def test_reading_into_given_memory_overwrites_all_of_it(tmp_path):
    path = write_store(tmp_path / "s.zarr", n_lat=7, spatial_chunks=(4, 6))
    reader = TileReader(path, lat_range=(4, 8), lon_range=(0, 6), channels=[3, 0, 1], model_lat=8)
    fields_shape, forcings_shape = reader.buffer_shapes(2)
    out = (torch.full(fields_shape, float("nan")), torch.full(forcings_shape, float("nan")))  # a used slot
    sample = reader.sample(1, 2, out=out)
    expected = reader.sample(1, 2)
    for name in ("inputs", "targets", "forcings"):
        torch.testing.assert_close(getattr(sample, name), getattr(expected, name), rtol=0, atol=0)
    assert sample.inputs.untyped_storage().data_ptr() == out[0].untyped_storage().data_ptr()
    assert sample.forcings.data_ptr() == out[1].data_ptr()
    with pytest.raises(ValueError, match=r"out fields must be a contiguous float32 CPU tensor of shape \(2, 3, 4, 6\)"):
        reader.sample(1, 1, out=out)


def test_misaligned_tile_warns_with_the_wasted_fraction_and_still_reads_right(stores):
    path = stores[((2, 2), False)]  # chunks of 4 x 6
    with pytest.warns(ChunkAlignmentWarning, match=r"rows \[2, 6\).*wasted fraction 0\.500"):
        reader = TileReader(path, lat_range=(2, 6), lon_range=(0, 6))
    assert reader.alignment.tile_bytes == 4 * 4 * 6 * 8
    assert reader.alignment.fetched_bytes == 2 * reader.alignment.tile_bytes
    with ReadRecorder() as recorder:
        sample = reader.sample(0)
    assert recorder.n_bytes == reader.alignment.fetched_bytes * 2  # inputs and one target
    np.testing.assert_allclose(sample.inputs.numpy(), naive_fields(path, reader, [0], (2, 6), (0, 6))[0],
                               rtol=1e-5, atol=1e-5)


def _set_root_attribute(path, key, value):
    metadata_file = path / "zarr.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["attributes"][key] = value
    metadata_file.write_text(json.dumps(metadata))


def test_incomplete_store_is_refused_with_the_remedy(tmp_path):
    path = write_store(tmp_path / "partial.zarr", n_lat=4, n_lon=4, complete=False)
    with pytest.raises(StoreError, match=r"partial\.zarr.*incomplete.*Rerun the preprocessing"):
        TileReader(path, lat_range=(0, 4), lon_range=(0, 4))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: _set_root_attribute(p, "schema_version", 99), r"schema_version 99, expected 1"),
    (lambda p: _set_root_attribute(p, "std", [1.0] * 3), r"'std' has 3 values, expected 8"),
    (lambda p: _set_root_attribute(p, "mean", [0.0] * 7 + [float("nan")]), r"'mean' holds non-finite"),
    (lambda p: _set_root_attribute(p, "static_std", [1.0, 0.0]), r"channel 'orography' is 0\.0"),
    (lambda p: _set_root_attribute(p, "channels", json.loads((p / "zarr.json").read_text())["attributes"]
                                   ["channels"][:-1] + [{"variable": "z", "level": 700}]),
     r"levels \[700\] of variable 'z' missing"),
    (lambda p: _set_root_attribute(p, "channels", json.loads((p / "zarr.json").read_text())["attributes"]
                                   ["channels"][:-1] + [{"variable": "q", "level": 500}]),
     r"variable 'q' missing"),
    (lambda p: _set_root_attribute(p, "static_channels", ["lsm", "t2m"]),
     r"variable 't2m' has dims \('time', 'latitude', 'longitude'\), expected \('latitude', 'longitude'\)"),
], ids=["schema", "statistics-length", "statistics-nan", "zero-std", "missing-level", "missing-variable", "dims"])
def test_broken_contract_is_refused_naming_store_and_fault(tmp_path, breakage, message):
    path = write_store(tmp_path / "broken.zarr", n_lat=4, n_lon=4)
    breakage(path)
    with pytest.raises(StoreError, match=r"broken\.zarr.*" + message):
        TileReader(path, lat_range=(0, 4), lon_range=(0, 4))


def test_missing_store_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"nowhere\.zarr: cannot open as a zarr group"):
        TileReader(tmp_path / "nowhere.zarr", lat_range=(0, 4), lon_range=(0, 4))


def test_bad_arguments_are_refused(stores):
    path = stores[((1, 1), True)]
    with pytest.raises(ValueError, match=r"lon_range=\(0, 13\) must satisfy 0 <= first < stop <= 12"):
        TileReader(path, lat_range=(0, 8), lon_range=(0, 13))
    with pytest.raises(ValueError, match=r"lat_range=\(4, 4\)"):
        TileReader(path, lat_range=(4, 4), lon_range=(0, 12))
    with pytest.raises(ValueError, match=r"channels \[8\] outside 0\.\.7"):
        TileReader(path, lat_range=(0, 8), lon_range=(0, 12), channels=[0, 8])
    with pytest.raises(ValueError, match=r"static_channels \[1, 1\] repeat"):
        TileReader(path, lat_range=(0, 8), lon_range=(0, 12), static_channels=[1, 1])
    with pytest.raises(ValueError, match="pin_memory=True needs an accelerator"):
        TileReader(path, lat_range=(0, 8), lon_range=(0, 12), pin_memory=True)
    reader = TileReader(path, lat_range=(0, 8), lon_range=(0, 12))
    with pytest.raises(IndexError, match=r"time index 2 with 2 lead steps needs time indices 2\.\.4.*0\.\.3"):
        reader.sample(2, lead_steps=2)


def test_window_across_a_time_gap_is_refused(tmp_path):
    times = np.array(["2020-01-01T00", "2020-01-01T06", "2020-01-02T00", "2020-01-02T06"], dtype="datetime64[ns]")
    path = write_store(tmp_path / "gap.zarr", n_lat=4, n_lon=4, times=times)
    reader = TileReader(path, lat_range=(0, 4), lon_range=(0, 4))
    assert reader.sample(2).time == times[2]
    with pytest.raises(ValueError, match=r"time indices 1\.\.2 .* span a gap"):
        reader.sample(1)


def test_irregular_time_axis_is_refused(tmp_path):
    times = np.array(["2020-01-01T00", "2020-01-01T06", "2020-01-01T09"], dtype="datetime64[ns]")
    path = write_store(tmp_path / "odd.zarr", n_lat=4, n_lon=4, times=times)
    with pytest.raises(StoreError, match=r"multiples of time_step_hours=6.*time\[1\]"):
        TileReader(path, lat_range=(0, 4), lon_range=(0, 4))


def test_raw_samples_normalised_by_the_caller_equal_normalised_samples(tmp_path):
    """``normalize=False`` + ``normalize_into`` (what the training inputs do on the GPU) gives the
    reader's own normalisation, padded rows included, on either memory layout, in place or into
    another tensor of another dtype."""
    path = write_store(tmp_path / "s.zarr", n_lat=7, spatial_chunks=(4, 6))
    options = dict(lat_range=(4, 8), lon_range=(0, 6), model_lat=8)
    normalised = TileReader(path, **options).sample(2, 1)
    raw_reader = TileReader(path, **options, normalize=False)
    raw = raw_reader.sample(2, 1)
    assert not torch.allclose(raw.inputs, normalised.inputs)
    for mine, expected in ((raw.inputs, normalised.inputs), (raw.targets, normalised.targets)):
        # fields / std - mean / std against (fields - mean) / std: two float32 roundings of |fields| / std
        atol = 4 * torch.finfo(torch.float32).eps * float((mine.abs() * torch.from_numpy(raw_reader._inv_std)).max())
        contiguous = mine.contiguous()  # channel-last memory as well as the reader's channel-first views
        for fields in (mine.clone(), contiguous):
            torch.testing.assert_close(raw_reader.normalize_into(fields, fields), expected, rtol=1e-6, atol=atol)
            into = torch.full_like(fields, float("nan"), dtype=torch.float64)  # padded rows must be written
            assert raw_reader.normalize_into(mine, into) is into
            torch.testing.assert_close(into, expected.double(), rtol=1e-6, atol=atol)
        assert torch.count_nonzero(mine[..., 3, :, :]) == 0
