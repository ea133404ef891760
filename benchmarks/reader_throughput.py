"""Samples per second one rank's reader delivers, and what each sample costs the host.

Reads whole samples (inputs + one target) of one tile with ``data.reader.TileReader`` through
``data.prefetch.Prefetcher`` (``--threads``: reader threads in this process) and
``data.process_prefetch.ProcessPrefetcher`` (``--processes``: reader processes filling shared
slots), as training does, and prints per configuration: samples/s, CPU time per sample of the
readers (user and system; this process for threads, the reader processes for processes), page
faults per sample and the cores they kept busy. With a GPU present the samples land in
page-locked memory, as in training.

    python -m benchmarks.reader_throughput --store /tmp/era5.zarr --threads 1 4 8 --processes 4 8

The store is written first (``data.synthetic.write_synthetic_store``, 0.25 deg ERA5-shaped, 69 channels)
when it does not exist; ``--store-grid`` and ``--chunk-grid`` choose its shape and chunking.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from pathlib import Path


import torch

from data.process_prefetch import PREFETCHERS
from benchmarks.step_setup import ERA5_LEVELS
from data.reader import TileReader
from data.synthetic import write_synthetic_store
from data.sampler import valid_time_indices
from launch.runtime.rank_inputs import store_attrs


def usage(pids: list[int]) -> tuple[float, float, int]:
    """(user s, system s, minor + major page faults) of this process or of the processes ``pids``."""
    if not pids:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime, used.ru_stime, used.ru_minflt + used.ru_majflt
    user = system = faults = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:  # /proc/PID/stat: minflt is field 10, majflt 12, utime 14, stime 15
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        faults += int(fields[7]) + int(fields[9])
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system, faults


def open_reader(store: str, model_lat: int | None, pin: bool) -> TileReader:
    """The whole grid as one tile, read raw (training normalises on the device)."""
    _, n_lat, n_lon = store_attrs(store)
    n_lat = model_lat or n_lat
    return TileReader(store, lat_range=(0, n_lat), lon_range=(0, n_lon), model_lat=n_lat, pin_memory=pin,
                      normalize=False)


def measure(reader: TileReader, kind: str, workers: int, samples: int) -> dict:
    """Read ``samples`` samples with ``workers`` prefetch threads or processes, after each has
    read once (first-use costs stay out), releasing each sample at once."""
    indices = [int(i) for i in valid_time_indices(reader.times, 1)] * (samples + 3 * workers + 2)
    with PREFETCHERS[kind](reader, indices, lead_steps=1, depth=2 * workers, workers=workers) as prefetcher:
        for _ in range(2 * workers):
            prefetcher.release(next(prefetcher))
        pids = [worker.pid for worker in getattr(prefetcher, "_workers", [])]
        before, t0 = usage(pids), time.perf_counter()
        for _ in range(samples):
            prefetcher.release(next(prefetcher))
        seconds, after = time.perf_counter() - t0, usage(pids)
    return {"samples": samples, "seconds": seconds, "user": after[0] - before[0], "system": after[1] - before[1],
            "faults": after[2] - before[2]}


def row(label: str, result: dict, sample_mb: float) -> str:
    n, seconds = result["samples"], result["seconds"]
    busy = (result["user"] + result["system"]) / seconds
    return (f"| {label} | {n / seconds:.2f} | {n * sample_mb / 1e3 / seconds:.2f} | {result['user'] / n * 1e3:.0f} "
            f"| {result['system'] / n * 1e3:.0f} | {result['faults'] / n:.0f} | {busy:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="written here first if it does not exist")
    parser.add_argument("--store-grid", default="721x1440", help="NLATxNLON of a store written by this script")
    parser.add_argument("--chunk-grid", default="1x1", help="tile grid the written store is chunked for")
    parser.add_argument("--times", type=int, default=8, help="time steps of a written store")
    parser.add_argument("--model-lat", type=int, default=720, help="rows of the model grid (0: the store's)")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--processes", type=int, nargs="*", default=[])
    parser.add_argument("--samples", type=int, default=6, help="timed samples per thread or process")
    args = parser.parse_args(argv)
    if not args.store.exists():
        grid = tuple(int(v) for v in args.store_grid.lower().split("x"))
        chunk_grid = tuple(int(v) for v in args.chunk_grid.lower().split("x"))
        t0 = time.perf_counter()
        write_synthetic_store(args.store, grid, ERA5_LEVELS, args.times, tile_grid=chunk_grid)
        print(f"wrote {args.store} in {time.perf_counter() - t0:.0f} s", flush=True)
    pin = torch.cuda.is_available()
    model_lat = args.model_lat or None
    reader = open_reader(str(args.store), model_lat, pin=pin)
    sample_mb = 2 * reader.n_channels * reader.tile_shape[0] * reader.tile_shape[1] * 4 / 1e6
    chunks = {tuple(read.array.chunks) for read in reader._reads}
    print(f"{args.store}: tile {reader.tile_shape[0]} x {reader.tile_shape[1]}, {reader.n_channels} channels, "
          f"{sample_mb:.0f} MB per sample (input + 1 target, float32), chunks {sorted(chunks)}, "
          f"{multiprocessing.cpu_count()} CPUs, page-locked buffers: {pin}")
    print("| readers | samples/s | GB/s | user ms/sample | system ms/sample | page faults/sample "
          "| cores busy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, counts in (("thread", args.threads), ("process", args.processes)):
        for workers in counts:
            result = measure(reader, kind, workers, args.samples * workers)
            print(row(f"{workers} {kind}{'es' if kind == 'process' else 's'}", result, sample_mb), flush=True)


if __name__ == "__main__":
    main()
