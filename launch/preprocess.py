"""Preprocess reanalysis files (netCDF, GRIB, zarr) into one tile-chunked zarr store.

    python launch/preprocess.py INPUT... --output STORE.zarr [--config configs/data/<x>.yaml] [flags]

With no selection the store takes every field of the inputs (the run prints what it took
and what it skipped, and why); a config file (YAML) or flags narrow the variables and
levels and set the period and options; flags override the config.
A killed run resumes when rerun with the same command; ``--append`` extends a finished
store with later times. See ``data/preprocess.py`` for what a run does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:  # runnable as a script from a checkout, without installation
    sys.path.insert(0, str(REPOSITORY))


from data.normalize import InputError  # noqa: E402
from data.preprocess import PreprocessError, preprocess  # noqa: E402
from data.preprocess_config import DataConfigError, load_data_config  # noqa: E402
from data.schema import StoreError  # noqa: E402


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name] if text.lower() != "none" else []


def _levels(text: str) -> list[int]:
    try:
        return [int(level) for level in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {text!r}: expected comma-separated hPa, e.g. 500,850") from None


def _pair(flag: str, separator: str, convert):
    def parse(text: str):
        parts = text.split(separator)
        try:
            if len(parts) != 2:
                raise ValueError
            return tuple(convert(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected two values separated by "
                                             f"{separator!r}") from None
    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python launch/preprocess.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="input files, folders or glob patterns (netCDF, GRIB, zarr)")
    parser.add_argument("--output", required=True, type=Path, help="the zarr store to write (a local path)")
    parser.add_argument("--config", type=Path, help="YAML data config, e.g. configs/data/era5-0.25.yaml")
    selection = parser.add_argument_group("selection (overrides the config; default: every field of the inputs)")
    selection.add_argument("--variables", type=_names, help="keep only these variables (any group), comma-separated")
    selection.add_argument("--surface", type=_names, help="surface variables, comma-separated, or 'none'")
    selection.add_argument("--upper-air", type=_names, help="upper-air variables, comma-separated, or 'none'")
    selection.add_argument("--static", type=_names, help="static variables, comma-separated, or 'none'")
    selection.add_argument("--levels", type=_levels, help="pressure levels in hPa, comma-separated (default: "
                           "those every upper-air variable holds)")
    selection.add_argument("--start", help="first time, ISO date or date-time")
    selection.add_argument("--end", help="last time, inclusive (a date includes the whole day)")
    selection.add_argument("--time-step", dest="time_step_hours", type=int, help="hours between stored steps")
    members = selection.add_mutually_exclusive_group()
    members.add_argument("--member", type=int, help="ensemble member to take from inputs with several")
    members.add_argument("--members", choices=["all"], dest="member",
                         help="'all': keep every ensemble member (a member dimension, statistics pooled over members)")
    selection.add_argument("--statistics-period", type=_pair("--statistics-period", ",", str),
                           help="FIRST,LAST days (inclusive) of the normalisation statistics; default all times")
    writing = parser.add_argument_group("writing")
    writing.add_argument("--tile-grid", type=_pair("--tile-grid", "x", int),
                         help="LATxLON tiles of the domain decomposition; chunks are one tile (default 1x1)")
    writing.add_argument("--on-nan", metavar="POLICY", help="missing values: fail (default), fill (the channel "
                         "mean, normalised 0) or mask (fill and add a 0/1 <variable>_mask channel), for every "
                         "variable or per variable with a default, e.g. sst=mask,tp=fill,fail")
    writing.add_argument("--batch-size", type=int, help="time steps per write (default: about 256 MiB)")
    writing.add_argument("--append", action="store_true", help="extend a finished store with later times")
    writing.add_argument("--recompute-statistics", action="store_true",
                         help="with --append: recompute statistics over --statistics-period")
    writing.add_argument("--overwrite", action="store_true", help="replace an existing store")
    writing.add_argument("--scheduler", help="dask: 'threads' (default), 'local' (a local dask.distributed "
                         "cluster) or a scheduler address tcp://host:port")
    writing.add_argument("--workers", type=int, help="threads or local worker processes (default: CPU count)")
    writing.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {key: getattr(args, key) for key in ("variables", "surface", "upper_air", "static", "levels",
                                                      "start", "end", "time_step_hours", "member",
                                                      "statistics_period", "tile_grid", "on_nan", "batch_size")}
    try:
        config = load_data_config(args.config, overrides)
    except DataConfigError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        summary = preprocess(args.inputs, args.output, config.selection(), tile_grid=config.tile_grid,
                             statistics_period=config.statistics_period, member=config.member,
                             on_nan=config.on_nan, append=args.append, overwrite=args.overwrite,
                             recompute_statistics=args.recompute_statistics, batch_size=config.batch_size,
                             scheduler=args.scheduler, workers=args.workers, progress=not args.quiet)
    except (InputError, PreprocessError, StoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.describe())
    print(f"wrote {summary.store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
