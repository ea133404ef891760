"""Preprocess reanalysis files (netCDF, GRIB, zarr) into one tile-chunked zarr store.

    python launch/preprocess.py INPUT... --output STORE.zarr [--config configs/data/<x>.yaml] [flags]

The config file (YAML) names variables, levels, period and options; flags override it.
A killed run resumes when rerun with the same command; ``--append`` extends a finished
store with later times. See ``data/preprocess.py`` for what a run does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:  # runnable as a script from a checkout, without installation
    sys.path.insert(0, str(REPOSITORY))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator  # noqa: E402

from data.combine import Selection  # noqa: E402
from data.normalize import InputError  # noqa: E402
from data.preprocess import NAN_POLICIES, PreprocessError, preprocess  # noqa: E402
from data.schema import STATIC, SURFACE, UPPER_AIR, StoreError  # noqa: E402


class DataConfig(BaseModel):
    """``configs/data/*.yaml``: what the store holds and how it is written."""

    model_config = ConfigDict(extra="forbid")

    surface: list[str] = list(SURFACE)
    upper_air: list[str] = list(UPPER_AIR)
    static: list[str] = ["lsm", "orography"]
    levels: list[int] = []
    start: str | None = None  # first time (ISO date or date-time), default the inputs' first
    end: str | None = None  # last time, inclusive; a bare date means its last time step
    time_step_hours: int | None = None  # default the inputs' step; a multiple of it subsamples
    statistics_period: tuple[str, str] | None = None  # first and last day, inclusive
    tile_grid: tuple[int, int] = (1, 1)
    member: int | None = None
    on_nan: Literal["fail", "fill"] = "fail"
    batch_size: int | None = None

    @field_validator("surface", "upper_air", "static")
    @classmethod
    def _known_names(cls, names: list[str], info) -> list[str]:
        known = {"surface": SURFACE, "upper_air": UPPER_AIR, "static": STATIC}[info.field_name]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"unknown {info.field_name} variables {unknown}; expected names from {list(known)}")
        return names

    def selection(self) -> Selection:
        if self.upper_air and not self.levels:
            raise ValueError(f"upper-air variables {self.upper_air} need pressure levels: set 'levels' or --levels")
        end = self.end
        if end is not None and len(end) <= 10:  # a date: include all of its time steps
            end = str(np.datetime64(end, "D") + np.timedelta64(1, "D") - np.timedelta64(1, "ns"))
        return Selection(surface=self.surface, upper_air=self.upper_air, static=self.static, levels=self.levels,
                         start=None if self.start is None else np.datetime64(self.start, "ns"),
                         end=None if end is None else np.datetime64(end, "ns"),
                         time_step_hours=self.time_step_hours)


def load_config(path: Path | None, overrides: dict) -> DataConfig:
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"error: --config {path}: {error}") from None
        if not isinstance(values, dict):
            raise SystemExit(f"error: --config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return DataConfig(**values)
    except ValidationError as error:
        problems = "; ".join(f"key {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"error: {'--config ' + str(path) if path else 'options'}: {problems}") from None


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
    selection = parser.add_argument_group("selection (overrides the config)")
    selection.add_argument("--surface", type=_names, help="surface variables, comma-separated, or 'none'")
    selection.add_argument("--upper-air", type=_names, help="upper-air variables, comma-separated, or 'none'")
    selection.add_argument("--static", type=_names, help="static variables, comma-separated, or 'none'")
    selection.add_argument("--levels", type=_levels, help="pressure levels in hPa, comma-separated")
    selection.add_argument("--start", help="first time, ISO date or date-time")
    selection.add_argument("--end", help="last time, inclusive (a date includes the whole day)")
    selection.add_argument("--time-step", dest="time_step_hours", type=int, help="hours between stored steps")
    selection.add_argument("--member", type=int, help="ensemble member to take from inputs with several")
    selection.add_argument("--statistics-period", type=_pair("--statistics-period", ",", str),
                           help="FIRST,LAST days (inclusive) of the normalisation statistics; default all times")
    writing = parser.add_argument_group("writing")
    writing.add_argument("--tile-grid", type=_pair("--tile-grid", "x", int),
                         help="LATxLON tiles of the domain decomposition; chunks are one tile (default 1x1)")
    writing.add_argument("--on-nan", choices=NAN_POLICIES, help="missing values: fail (default) or fill with "
                         "the channel mean (normalised 0)")
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
    overrides = {key: getattr(args, key) for key in ("surface", "upper_air", "static", "levels", "start", "end",
                                                      "time_step_hours", "member", "statistics_period",
                                                      "tile_grid", "on_nan", "batch_size")}
    config = load_config(args.config, overrides)
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
