"""Preprocessing throughput (GB of input per second) with dask's threads against a local cluster.

Writes a 0.25 deg ERA5-shaped synthetic input first (``data.synthetic.generate``: 721x1440,
CDS-style netCDF, one file per group) when ``--inputs`` holds none, then runs the whole
preprocessor (statistics pass, skeleton, batch writes, checksums) once per scheduler into
``--output-dir`` and prints, per scheduler, the wall time and the input bytes per second;
the stores are checked to be byte-identical.

    python -m benchmarks.preprocess_throughput --inputs /tmp/era5-input --steps 8 --schedulers threads local
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from data.combine import Selection
from data.preprocess import preprocess
from data.synthetic import generate

GRID = (721, 1440)


def store_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=Path, required=True, help="folder of input files (generated when empty)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where the stores go (default: beside inputs)")
    parser.add_argument("--steps", type=int, default=8, help="6-hourly time steps of the generated input")
    parser.add_argument("--levels", default="500,850", help="pressure levels of the generated input, hPa")
    parser.add_argument("--schedulers", nargs="+", default=["threads", "local"])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--tile-grid", default="2x2")
    args = parser.parse_args()

    if not any(args.inputs.glob("*.nc")):
        started = time.perf_counter()
        generate(args.inputs, grid=GRID, levels=[int(v) for v in args.levels.split(",")], steps=args.steps,
                 per="year")
        print(f"generated {args.inputs} in {time.perf_counter() - started:.0f} s")
    input_bytes = sum(p.stat().st_size for p in args.inputs.glob("*.nc"))
    output_dir = args.output_dir or args.inputs.parent
    tile_grid = tuple(int(v) for v in args.tile_grid.split("x"))
    print(f"input {input_bytes / 1e9:.2f} GB in {len(list(args.inputs.glob('*.nc')))} files, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    if "local" in args.schedulers:  # what starting the local cluster alone costs (part of the 'local' time)
        from distributed import LocalCluster

        started = time.perf_counter()
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None):
            print(f"a local cluster of {args.workers} workers starts and stops in "
                  f"{time.perf_counter() - started:.1f} s")
    stores = []
    for scheduler in args.schedulers:
        store = output_dir / f"preprocess-{scheduler}.zarr"
        started = time.perf_counter()
        summary = preprocess([args.inputs], store, Selection(), tile_grid=tile_grid, scheduler=scheduler,
                             workers=args.workers, overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        print(f"{scheduler:8s} workers {args.workers}: {seconds:6.1f} s, {input_bytes / seconds / 1e9:.3f} GB/s of "
              f"input ({len(summary.channels)} channels, {summary.n_times} steps, load average "
              f"{os.getloadavg()[0]:.1f})")
        stores.append(store)
    if len(stores) > 1:
        same = all(store_bytes(stores[0]) == store_bytes(other) for other in stores[1:])
        print(f"stores byte-identical: {same}")


if __name__ == "__main__":
    main()
