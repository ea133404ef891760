"""Per-rank tile reading from a 0.25 deg ERA5-shaped store: bytes and time per tile count.

Writes (once) a synthetic store shaped like 0.25 deg ERA5 (69 channels, 721 x 1440 float32,
the store contract's Blosc lz4 + shuffle) chunked for the finest tile grid, then for 1, 2, 4 and 8 tiles of the model grid
(720 rows: the pole row is cropped) reads samples (inputs + one target) of every tile with
``data.reader.TileReader`` and prints: the bytes of the chunks it fetched against the tile's
own bytes (uncompressed, from the chunk geometry, and the compressed chunk files it opened),
and the read time per sample per rank, against the naive approach (open the dataset with
xarray, read the whole sample, slice the tile).

    python -m benchmarks.reader_tiles --store /tmp/era5-tiles.zarr
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path


import numpy as np
import xarray as xr

from benchmarks.step_setup import ERA5_LEVELS
from data.synthetic import write_synthetic_store
from data.reader import TileReader
from parallel.tiling import balanced_bounds

TILE_GRIDS = [(1, 1), (1, 2), (2, 2), (2, 4)]
MODEL_LAT = 720


def chunk_file_bytes(store: Path, reader: TileReader, time_indices: list[int]) -> int:
    """Compressed bytes of the chunk files a read of ``time_indices`` opens (from the chunk grid)."""
    total = 0
    rows, columns = reader._rows, reader._columns
    for read in reader._reads:
        chunks = read.array.chunks
        lat_chunks = range(rows.start // chunks[-2], math.ceil(rows.stop / chunks[-2]))
        lon_chunks = range(columns.start // chunks[-1], math.ceil(columns.stop / chunks[-1]))
        levels = [None] if read.levels is None else (
            range(read.levels.start, read.levels.stop) if isinstance(read.levels, slice) else read.levels)
        for t in time_indices:
            for level in levels:
                for a in lat_chunks:
                    for b in lon_chunks:
                        key = [str(t)] + ([] if level is None else [str(level)]) + [str(a), str(b)]
                        path = store / read.name / "c" / "/".join(key)
                        total += path.stat().st_size if path.exists() else 0
    return total


def time_reads(function, repeats: int) -> float:
    function()  # warm the page cache and the code paths
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_sample(store: Path, time_index: int, rows: tuple[int, int], columns: tuple[int, int]) -> float:
    """Read the whole sample through xarray, then slice the tile; returns bytes read."""
    dataset = xr.open_zarr(store, consolidated=False)
    variables = [name for name, v in dataset.data_vars.items() if "time" in v.dims]
    window = dataset[variables].isel(time=slice(time_index, time_index + 2)).load()
    tile = window.isel(latitude=slice(*rows), longitude=slice(*columns))
    assert all(np.isfinite(tile[name].values).all() for name in variables)
    return sum(window[name].nbytes for name in variables)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="written here first if it does not exist")
    parser.add_argument("--times", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.store.exists():
        t0 = time.perf_counter()
        write_synthetic_store(args.store, (721, 1440), ERA5_LEVELS, args.times, tile_grid=TILE_GRIDS[-1])
        print(f"wrote {args.store} in {time.perf_counter() - t0:.0f} s (chunks for a "
              f"{TILE_GRIDS[-1][0]}x{TILE_GRIDS[-1][1]} tile grid)", flush=True)
    print(f"\n{args.store}: samples of input + 1 target (2 time steps), one thread per rank, median of "
          f"{args.repeats}; every tile of each grid read in turn (the per-rank time is their mean)")
    print("| tiles | tile (rows x columns) | fetched / tile bytes (uncompressed) | compressed MB opened per rank "
          "| MB per rank (float32) | read s per sample per rank | vs 1 tile |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for lat_tiles, lon_tiles in TILE_GRIDS:
        per_tile, ratios, opened = [], [], []
        for rows in balanced_bounds(MODEL_LAT, lat_tiles):
            for columns in balanced_bounds(1440, lon_tiles):
                reader = TileReader(args.store, lat_range=rows, lon_range=columns, model_lat=MODEL_LAT)
                per_tile.append(time_reads(lambda: reader.sample(0, 1), args.repeats))
                ratios.append(reader.alignment.fetched_bytes / reader.alignment.tile_bytes)
                opened.append(chunk_file_bytes(args.store, reader, [0, 1]))
        seconds = statistics.mean(per_tile)
        base = base or seconds
        shape = (MODEL_LAT // lat_tiles, 1440 // lon_tiles)
        tile_mb = 2 * 69 * shape[0] * shape[1] * 4 / 1e6
        print(f"| {lat_tiles * lon_tiles} ({lat_tiles}x{lon_tiles}) | {shape[0]} x {shape[1]} | {max(ratios):.4f} "
              f"| {statistics.mean(opened) / 1e6:.0f} | {tile_mb:.0f} | {seconds:.3f} | {base / seconds:.2f}x |",
              flush=True)
    rows, columns = balanced_bounds(MODEL_LAT, 2)[0], balanced_bounds(1440, 4)[0]
    seconds = time_reads(lambda: naive_sample(args.store, 0, rows, columns), args.repeats)
    nbytes = naive_sample(args.store, 0, rows, columns)
    print(f"\nnaive (xarray: open, read the whole sample, slice one of 8 tiles): {seconds:.3f} s per sample per "
          f"rank, {nbytes / 1e6:.0f} MB read for a {2 * 69 * 360 * 360 * 4 / 1e6:.0f} MB tile "
          f"({nbytes / (2 * 69 * 360 * 360 * 4):.1f}x)")


if __name__ == "__main__":
    main()
