"""Find, open and fingerprint the input files of a preprocessing run.

Inputs are netCDF (4 or 3), GRIB (through the optional ``cfgrib``) or zarr stores (for
example a WeatherBench2 dataset). Each opens lazily - nothing but metadata is read - and
comes back normalised by :func:`data.normalize.normalize_dataset`.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import xarray as xr

from data import netcdf3
from data.normalize import InputError, normalize_dataset

NETCDF_SUFFIXES = {".nc", ".nc3", ".nc4", ".netcdf", ".cdf"}
GRIB_SUFFIXES = {".grib", ".grib1", ".grib2", ".grb", ".grb1", ".grb2"}


def is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zattrs"))


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, glob patterns and directories -> sorted, unique input paths.

    A directory that is a zarr store is one input; any other directory contributes the
    netCDF and GRIB files and zarr stores below it.
    """
    found: dict[Path, None] = {}
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"input pattern {pattern!r} matches no files")
        for match in map(Path, matches):
            if not match.exists():
                raise InputError(f"input {match}: no such file or directory")
            paths = [match] if match.is_file() or is_zarr_store(match) else list(_walk(match))
            if not paths:
                raise InputError(f"input directory {match} holds no netCDF, GRIB or zarr inputs "
                                 f"(suffixes {sorted(NETCDF_SUFFIXES | GRIB_SUFFIXES)})")
            found.update(dict.fromkeys(path.resolve() for path in paths))
    return sorted(found)


def _walk(directory: Path) -> Iterator[Path]:
    for root, subdirectories, files in os.walk(directory):
        root_path = Path(root)
        for name in sorted(subdirectories):
            if is_zarr_store(root_path / name):
                yield root_path / name
        subdirectories[:] = sorted(d for d in subdirectories if not is_zarr_store(root_path / d))
        for name in sorted(files):
            if Path(name).suffix.lower() in NETCDF_SUFFIXES | GRIB_SUFFIXES:
                yield root_path / name


def input_format(path: Path) -> str:
    """'zarr', 'grib' or 'netcdf' (the default for files with other suffixes)."""
    if path.is_dir():
        if not is_zarr_store(path):
            raise InputError(f"input {path}: a directory that is not a zarr store")
        return "zarr"
    return "grib" if path.suffix.lower() in GRIB_SUFFIXES else "netcdf"


def open_input(path: Path, member: int | str | None = None) -> xr.Dataset:
    """The normalised, lazily indexed dataset of one input (no dask yet: data is read on demand)."""
    kind = input_format(path)
    try:
        if kind == "zarr":
            with warnings.catch_warnings():  # zarr v3 stores have no consolidated metadata: nothing to warn about
                warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
                dataset = xr.open_zarr(path, chunks=None, decode_times=False, consolidated=None)
        elif kind == "grib":
            _require_cfgrib(path)
            dataset = xr.open_dataset(path, engine="cfgrib", chunks=None, decode_times=False, cache=False)
        else:
            _check_netcdf3_size(path)
            dataset = xr.open_dataset(path, engine="netcdf4", chunks=None, decode_times=False, cache=False)
    except InputError:
        raise
    except Exception as error:  # the libraries raise OSError, ValueError, RuntimeError... for unreadable files
        raise InputError(f"{path}: cannot read this file as {kind} ({type(error).__name__}: {error}); "
                         f"is it truncated or corrupt?") from error
    return normalize_dataset(dataset, str(path), member)


def _require_cfgrib(path: Path) -> None:
    try:
        import cfgrib  # noqa: F401
    except ImportError:
        raise InputError(f"{path}: reading GRIB needs the optional dependency cfgrib; install it with "
                         f"`pip install 'weathermixer-jigsaw[grib]'` (it needs the ecCodes library), "
                         f"or convert the file to netCDF") from None


def _check_netcdf3_size(path: Path) -> None:
    if not netcdf3.is_netcdf3(path):
        return
    required = netcdf3.required_size(path)
    size = path.stat().st_size
    if required is not None and size < required:
        raise InputError(f"{path}: netCDF3 file is truncated: {size} bytes, its header describes {required} bytes")


def identity(path: Path) -> dict[str, object]:
    """Cheap fingerprint of an input (path, size, modification time) to tell reruns apart."""
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    stats = [f.stat() for f in files]
    return {"path": str(path), "size": sum(s.st_size for s in stats),
            "modified_ns": max((s.st_mtime_ns for s in stats), default=0)}


def sha256(path: Path) -> str:
    """Checksum of a file, or of a directory's relative file names and contents in sorted order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
