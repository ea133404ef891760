"""Reanalysis files -> one zarr store that follows the contract of ``data/schema.py``.

The run, in order (each step is skipped on a restart once it is recorded as done):

1. open every input lazily (``data.inputs``), normalise and combine them into one dask
   dataset of the selected variables, levels and times (``data.combine``);
2. per-channel statistics over the statistics period (``data.stats``), missing values
   (NaN: netCDF fill values decode to it) left out; a missing value of a variable whose
   policy is ``fail`` (``data.missing_values``) stops the run before anything is written;
3. the store skeleton: every array with its full time axis, chunks ``time=1, level=1``
   and one spatial chunk per tile, coordinates and static fields, root attributes with
   ``complete=False``;
4. the data, one batch of time steps at a time, each a region write; a finished batch
   is recorded in the progress folder ``<store>.progress`` beside the store;
5. checksums of the inputs, the final root attributes with ``complete=True``, and the
   progress folder removed.

A run killed anywhere restarts from its records and ends with the same bytes as an
uninterrupted run; the records hold the run's inputs and selection, and a restart with
different ones is refused. ``append=True`` extends a complete store with a later period
(the time axis must continue regularly) and keeps its statistics unless asked to
recompute them. Missing values are counted per field (channel, time); the ``fill`` and
``mask`` policies replace them with the channel mean of the statistics period (0 after
normalisation), ``mask`` adding a 0/1 channel of where the source had values.

Stores are local paths: the progress folder and the atomic record writes need a file system.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time as clock
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from tqdm.auto import tqdm

from data import inputs as input_files
from data.combine import Combined, Selection, combine_inputs
from data.normalize import InputError
from data.missing_values import MASK_SUFFIX, NanPolicy, NanPolicyError, mask_name
from data.vocabulary import find_candidates, resolve_selection
from data.schema import Channel, StoreAttrs, field_encoding, model_channel_order
from data.stats import MissingField, channel_statistics, static_statistics
from parallel.tiling import store_tile_chunks  # geometry only

BATCH_BYTES = 256 * 2**20  # default batch: about this much uncompressed data per region write
MIN_BATCHES = 20  # ... but at least this many batches (progress, restart granularity) where times allow
READ_BYTES = 32 * 2**20  # small grids: read several times per task, about this much, to keep dask overhead low
TIME_ENCODING = {"units": "hours since 1900-01-01 00:00:00", "calendar": "proleptic_gregorian", "dtype": "int64"}
MISSING_SHOWN = 10  # missing-value locations named in an error or summary


class PreprocessError(ValueError):
    """A run that cannot go on: a store in the way, a restart that differs, missing values under 'fail'."""


@dataclass(frozen=True)
class Summary:
    """What a run wrote, for the final report (:meth:`describe`)."""

    store: Path
    channels: list[str]
    static: list[str]
    levels: list[int]
    first_time: np.datetime64
    last_time: np.datetime64
    n_times: int
    time_step_hours: int
    grid: tuple[int, int]
    tile_grid: tuple[int, int]
    spatial_chunks: tuple[int, int]
    statistics_period: tuple[str, str]
    size_on_disk: int
    seconds: float
    written_bytes: int  # uncompressed bytes of the batches this run wrote
    batches_written: int
    batches_skipped: int  # found finished (restart) or, for a finished store, all of them
    missing: list[MissingField]
    on_nan: str
    selection_report: list[str] = field(default_factory=list)  # what was taken, what skipped and why
    members: list[int] | None = None  # ensemble member labels of a store with a member dimension

    def describe(self) -> str:
        rate = self.written_bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0
        lines = [
            *self.selection_report,
            f"store      {self.store}",
            f"channels   {len(self.channels)}: {' '.join(self.channels)}",
            f"static     {' '.join(self.static) or 'none'}",
            f"levels     {' '.join(map(str, self.levels)) + ' hPa' if self.levels else 'none'}",
            *([f"members    {len(self.members)}: {' '.join(map(str, self.members))}"] if self.members else []),
            f"time       {_iso(self.first_time)} .. {_iso(self.last_time)}, {self.n_times} steps of "
            f"{self.time_step_hours} h",
            f"grid       {self.grid[0]} x {self.grid[1]} (latitude x longitude), tile grid "
            f"{self.tile_grid[0]}x{self.tile_grid[1]}, chunks time=1 level=1 latitude={self.spatial_chunks[0]} "
            f"longitude={self.spatial_chunks[1]}",
            f"statistics {self.statistics_period[0]} .. {self.statistics_period[1]}",
            f"size       {self.size_on_disk / 2**20:.1f} MiB on disk",
            f"run        {self.batches_written} batches written, {self.batches_skipped} already done, "
            f"{self.seconds:.1f} s, {rate:.1f} MiB/s (uncompressed)",
        ]
        if self.missing:
            points = sum(m.count for m in self.missing)
            lines.append(f"missing    {points} values in {len(self.missing)} fields, filled with the channel mean "
                         f"(normalised 0): {describe_missing(self.missing)}")
        return "\n".join(lines)


def describe_missing(missing: Sequence[MissingField]) -> str:
    shown = ", ".join(f"{m.channel} at {np.datetime_as_string(m.time, unit='h')} ({m.count} points)"
                      for m in missing[:MISSING_SHOWN])
    return shown + (f", ... ({len(missing) - MISSING_SHOWN} more fields)" if len(missing) > MISSING_SHOWN else "")


def spatial_chunks(grid: tuple[int, int], tile_grid: tuple[int, int]) -> tuple[int, int]:
    """One chunk per tile of ``tile_grid`` (:func:`parallel.tiling.store_tile_chunks`)."""
    try:
        return store_tile_chunks(grid, tile_grid)
    except ValueError as error:
        raise PreprocessError(str(error)) from None


# ------------------------------------------------------------------------------- progress
class ProgressRecord:
    """The folder ``<store>.progress``: the run's identity, its finished steps and batches.

    Every file is written to a temporary name and renamed, so a kill never leaves half a record.
    """

    def __init__(self, store: Path):
        self.folder = store.with_name(store.name + ".progress")
        self.run_file = self.folder / "run.json"

    def exists(self) -> bool:
        return self.run_file.is_file()

    def read(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text())

    def write(self, run: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.run_file, json.dumps(run, indent=1))

    def batch_file(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.json"

    def finish_batch(self, index: int, missing: list[MissingField]) -> None:
        _write_atomically(self.batch_file(index), json.dumps([_missing_to_json(m) for m in missing]))

    def finished_batches(self) -> dict[int, list[MissingField]]:
        done = {}
        for path in sorted(self.folder.glob("batch-*.json")):
            done[int(path.stem.split("-")[1])] = [_missing_from_json(m) for m in json.loads(path.read_text())]
        return done

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _missing_to_json(missing: MissingField) -> dict[str, Any]:
    return {"channel": missing.channel, "time": str(missing.time), "count": missing.count}


def _missing_from_json(item: dict[str, Any]) -> MissingField:
    return MissingField(item["channel"], np.datetime64(item["time"], "ns"), item["count"])


# ------------------------------------------------------------------------------- the run
def _run_identity(paths, selection: Selection, combined: Combined, *, append: bool, **options) -> dict[str, Any]:
    """What a run writes, as its progress record keeps it: a rerun resumes only the same run."""
    times = combined.dataset["time"].values
    options["tile_grid"] = list(options["tile_grid"])
    period = options.pop("statistics_period")
    return {"kind": "append" if append else "create",
            "inputs": [input_files.identity(path) for path in paths],
            "selection": _selection_to_json(selection, combined.time_step_hours),
            "times": [str(times[0]), str(times[-1]), int(times.size)],
            **options, "statistics_period": list(period) if period else None}


def _combine_in_batches(opened, selection: Selection, grid: tuple[int, int], batch_size: int | None,
                        statistics_batch: int) -> tuple[Combined, int]:
    """The combined inputs, read in time chunks that never straddle two write batches, and the
    batch size (given, or about ``BATCH_BYTES`` and at least ``MIN_BATCHES`` batches)."""
    time_chunk = max(1, READ_BYTES // (4 * grid[0] * grid[1] * max(1, len(selection.levels))))
    if batch_size is not None:
        time_chunk = math.gcd(time_chunk, batch_size)  # a read task never straddles two batches
    combined = combine_inputs(opened, selection, time_chunk=time_chunk)
    if batch_size is not None:
        return combined, batch_size
    batch_size = min(statistics_batch, math.ceil(combined.dataset.sizes["time"] / MIN_BATCHES))
    if time_chunk > batch_size:  # chunk again (lazily, metadata only) so a read task serves one batch
        time_chunk = batch_size
        combined = combine_inputs(opened, selection, time_chunk=time_chunk)
    return combined, batch_size // time_chunk * time_chunk


@dataclass(frozen=True)
class Plan:
    """What a run will write: its inputs, the resolved selection and channels, the lazy combined data."""

    paths: list[Path]
    existing: dict[str, Any] | None  # the store an append extends
    selection: Selection
    report: list[str]  # what was taken, what skipped and why
    channels: list[Channel]
    grid: tuple[int, int]
    combined: Combined
    batch_size: int
    statistics_batch: int


def _plan(inputs, selection: Selection, policy: NanPolicy, member, output: Path, record: ProgressRecord,
          append: bool, batch_size: int | None, progress: bool) -> Plan:
    """Open the inputs (metadata only), resolve the selection and combine the fields lazily."""
    paths = input_files.expand_inputs(inputs)
    opened = [(str(path), input_files.open_input(path, member))
              for path in tqdm(paths, desc="opening inputs", unit="file", disable=not progress)]
    existing = _existing_store(output, record) if append else None
    if existing is not None:
        selection = _continue_after(existing, _store_selection(existing["attrs"], selection))
    selection, report = resolve_selection(selection, find_candidates(opened))
    if progress:
        tqdm.write("\n".join(report))
    if batch_size is not None and batch_size < 1:
        raise PreprocessError(f"batch_size={batch_size}: expected at least 1 time step")
    channels = model_channel_order(policy.with_masks(selection.surface), policy.with_masks(selection.upper_air),
                                   list(selection.levels))
    if not channels:
        raise PreprocessError(f"no time-dependent fields selected ({report[0]}); a store needs at least one "
                              f"surface or upper-air variable")
    grid = (opened[0][1].sizes["latitude"], opened[0][1].sizes["longitude"])  # combine checks all are equal
    statistics_batch = max(1, BATCH_BYTES // (4 * len(channels) * grid[0] * grid[1]))  # never need to resume
    combined, batch_size = _combine_in_batches(opened, selection, grid, batch_size, statistics_batch)
    combined = _with_mask_fields(combined, policy.masked([*selection.surface, *selection.upper_air]))
    if member == "all" and "member" not in combined.dataset.dims:
        raise PreprocessError("--members all: no input has an ensemble member axis (looked for dimensions "
                              "number, member, realization, ensemble_member or standard_name 'realization')")
    return Plan(paths, existing, selection, report, channels, grid, combined, batch_size, statistics_batch)


def preprocess(inputs: Sequence[str | Path], output: str | Path, selection: Selection, *,
               tile_grid: tuple[int, int] = (1, 1), statistics_period: tuple[str, str] | None = None,
               member: int | str | None = None, on_nan: str = "fail", append: bool = False, overwrite: bool = False,
               recompute_statistics: bool = False, batch_size: int | None = None, scheduler: str | None = None,
               workers: int | None = None, progress: bool = True,
               after_batch: Callable[[int], None] | None = None) -> Summary:
    """Write (or extend, or finish) the store ``output`` from ``inputs``; see the module docstring.

    Args:
        inputs: files, folders or glob patterns (netCDF, GRIB, zarr).
        selection: variables, levels, period and time step (``data.combine.Selection``).
        tile_grid: ``(latitude tiles, longitude tiles)`` of the domain decomposition the
            chunks align to.
        statistics_period: first and last day (inclusive, ISO dates or times) of the
            statistics; default all written times (append: the store's, kept).
        member: ensemble member to take from inputs with an ensemble dimension, or 'all' to keep
            the ``member`` dimension in the store (statistics pooled over members).
        on_nan: missing-value policy, for all or per variable: 'fail', 'fill', 'mask' or e.g.
            'sst=mask,fail' (``data.missing_values.NanPolicy``).
        append: extend a complete store with the later times of ``inputs``.
        overwrite: replace whatever is at ``output`` (and its progress records).
        recompute_statistics: with ``append``, recompute statistics over ``statistics_period``
            from the extended store.
        batch_size: time steps per region write (default: about 256 MiB of data).
        scheduler: None or 'threads' (threaded dask scheduler), 'local' (a local
            dask.distributed cluster of ``workers`` processes) or a scheduler address.
        workers: threads or worker processes (default: the CPU count).
        progress: show progress bars.
        after_batch: called with each batch index once the batch is recorded (progress hooks, tests).
    """
    started = clock.perf_counter()
    try:
        policy = NanPolicy.parse(on_nan)
    except NanPolicyError as error:
        raise PreprocessError(str(error)) from None
    output = Path(output).absolute()
    record = ProgressRecord(output)
    if overwrite and not append:
        record.remove()
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()

    plan = _plan(inputs, selection, policy, member, output, record, append, batch_size, progress)
    existing, selection, channels, combined = plan.existing, plan.selection, plan.channels, plan.combined
    dataset, chunks = combined.dataset, spatial_chunks(plan.grid, tile_grid)

    run = _run_identity(plan.paths, selection, combined, append=append, member=member, on_nan=policy.text(),
                        tile_grid=tile_grid, batch_size=plan.batch_size, statistics_period=statistics_period,
                        recompute_statistics=recompute_statistics)
    if existing is not None:
        _check_append(existing, dataset, channels, selection, combined.time_step_hours, tile_grid, output)
        _check_append_statistics(existing, statistics_period, recompute_statistics)
        run["base_times"] = existing["n_times"]
    else:
        finished = _check_create(output, record, run)
        if finished is not None:
            return replace(finished, selection_report=plan.report)
    resumed = _resume(record, run, output)

    with dask_scheduler(scheduler, workers):
        if "statistics" not in resumed:
            resumed["statistics"] = _statistics(combined, channels, selection, statistics_period, existing,
                                                policy, plan.statistics_batch, progress, recompute_statistics)
            record.write(resumed)
        statistics = resumed["statistics"]
        if not resumed.get("skeleton"):
            with disk_space_for(output, "the store's skeleton (metadata, coordinates, static fields)",
                                dataset.nbytes):
                _write_skeleton(output, dataset, channels, selection, statistics, run, existing, tile_grid, chunks)
            resumed["skeleton"] = True
            record.write(resumed)
        offset = existing["n_times"] if existing else 0
        written, written_steps, skipped, missing = _write_batches(
            output, combined, channels, statistics, policy, plan.batch_size, offset, record, progress, after_batch)
        if append and recompute_statistics:
            statistics = _statistics_from_store(output, channels, list(selection.static),
                                                statistics["statistics_period"], plan.statistics_batch, progress)
        with disk_space_for(output, "the store's final attributes", 0):
            _finalise(output, plan.paths, record, resumed, statistics, existing, missing, workers)

    written_bytes = written_steps * 4 * len(channels) * plan.grid[0] * plan.grid[1]
    summary = _summary(output, channels, selection, tile_grid, chunks, started, written_bytes,
                       written_batches=len(written), skipped_batches=skipped, missing=missing, on_nan=policy.text())
    return replace(summary, selection_report=plan.report)


def _selection_to_json(selection: Selection, step_hours: int) -> dict[str, Any]:
    return {"surface": list(selection.surface), "upper_air": list(selection.upper_air),
            "static": list(selection.static), "levels": sorted(int(v) for v in selection.levels),
            "start": None if selection.start is None else str(np.datetime64(selection.start, "ns")),
            "end": None if selection.end is None else str(np.datetime64(selection.end, "ns")),
            "time_step_hours": step_hours}


def _check_create(output: Path, record: ProgressRecord, run: dict[str, Any]) -> Summary | None:
    """Nothing in the way of a new store; a finished store of the same run is returned as it is."""
    if record.exists() or not output.exists():
        return None
    attrs = _read_attrs(output)
    if attrs is not None and attrs.get("complete") and attrs.get("preprocess", [{}])[-1].get("run") == run:
        record.remove()  # a run killed after marking the store complete leaves its records behind
        return _summary_of_store(output, run)
    raise PreprocessError(f"{output} exists and is not a store this run is resuming (no {record.folder}); "
                          f"pass --overwrite to replace it or --append to extend it with later times")


def _resume(record: ProgressRecord, run: dict[str, Any], output: Path) -> dict[str, Any]:
    """The records of a killed run with the same identity, or fresh records for this run."""
    if not record.exists():  # recorded once the statistics are known, so a refused run leaves nothing behind
        return {"run": run}
    resumed = record.read()
    if resumed.get("run") != run:
        previous = resumed.get("run", {})
        differences = sorted(key for key in set(run) | set(previous) if run.get(key) != previous.get(key))
        raise PreprocessError(
            f"{output}: an unfinished run with different {differences} is recorded in {record.folder}; rerun it "
            f"with the same inputs and options to finish it, or pass --overwrite to start again "
            f"(recorded: { {key: previous.get(key) for key in differences} })")
    return resumed


def _read_attrs(output: Path) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_group(output, mode="r").attrs)
    except Exception:  # not a zarr group (a file, a folder of something else)
        return None


# ------------------------------------------------------------------------------- append
def _existing_store(output: Path, record: ProgressRecord) -> dict[str, Any]:
    """Attributes and time axis of the store to extend (complete, or mid-append of this run)."""
    attrs = _read_attrs(output)
    if attrs is None:
        raise PreprocessError(f"--append: {output} is not a zarr store; run without --append to create it")
    parsed = StoreAttrs.from_json(attrs, store=str(output))
    resuming = record.exists() and record.read().get("run", {}).get("kind") == "append"
    if not parsed.complete and not resuming:
        raise PreprocessError(f"--append: {output} is incomplete (its writing run did not finish); finish that "
                              f"run first by rerunning it without --append")
    times = xr.open_zarr(output, consolidated=False)["time"].values
    n_times = record.read()["run"]["base_times"] if resuming else times.size
    return {"attrs": parsed, "raw_attrs": attrs, "times": times[:n_times], "n_times": n_times}


def _store_selection(attrs: StoreAttrs, selection: Selection) -> Selection:
    """An append takes the store's variables and levels unless the selection names its own."""
    surface = [c.variable for c in attrs.channels if c.level is None]
    upper_air = list(dict.fromkeys(c.variable for c in attrs.channels if c.level is not None))
    levels = sorted({c.level for c in attrs.channels if c.level is not None})
    stored = {c.variable for c in attrs.channels}  # mask channels come from the policy, not the inputs
    surface = [v for v in surface if not (v.endswith(MASK_SUFFIX) and v[: -len(MASK_SUFFIX)] in stored)]
    upper_air = [v for v in upper_air if not (v.endswith(MASK_SUFFIX) and v[: -len(MASK_SUFFIX)] in stored)]
    defaults = {"surface": surface, "upper_air": upper_air, "static": list(attrs.static_channels), "levels": levels}
    return replace(selection, **{key: value for key, value in defaults.items() if getattr(selection, key) is None})


def _continue_after(existing: dict[str, Any], selection: Selection) -> Selection:
    """Start the appended period one step after the store's last time unless asked otherwise."""
    step = np.timedelta64(existing["attrs"].time_step_hours, "h")
    first_new = existing["times"][-1] + step
    start = selection.start
    if start is None or np.datetime64(start, "ns") <= existing["times"][-1]:
        start = first_new
    return replace(selection, start=start, time_step_hours=selection.time_step_hours
                   or existing["attrs"].time_step_hours)


def _check_append(existing, dataset: xr.Dataset, channels: list[Channel], selection: Selection, step_hours: int,
                  tile_grid: tuple[int, int], output: Path) -> None:
    attrs: StoreAttrs = existing["attrs"]
    stored = xr.open_zarr(output, consolidated=False)
    expected = {"channels": [c.name for c in attrs.channels], "static": list(attrs.static_channels),
                "time step (h)": attrs.time_step_hours, "tile grid": list(attrs.tile_grid)}
    found = {"channels": [c.name for c in channels], "static": list(selection.static),
             "time step (h)": step_hours, "tile grid": list(tile_grid)}
    for key in expected:
        if expected[key] != found[key]:
            raise PreprocessError(f"--append to {output}: {key} {found[key]} differ from the store's {expected[key]}")
    for axis in ("latitude", "longitude"):
        if stored[axis].size != dataset[axis].size or not np.allclose(stored[axis], dataset[axis], atol=1e-6):
            raise PreprocessError(f"--append to {output}: the inputs' {axis} grid ({dataset[axis].size} points) "
                                  f"differs from the store's ({stored[axis].size} points)")
    expected_first = existing["times"][-1] + np.timedelta64(step_hours, "h")
    if dataset["time"].values[0] != expected_first:
        raise PreprocessError(f"--append to {output}: the new times start at {dataset['time'].values[0]}; the "
                              f"time axis must continue regularly at {expected_first}")


def _check_append_statistics(existing, period, recompute: bool) -> None:
    stored = list(existing["attrs"].statistics_period)
    if period is not None and list(period) != stored and not recompute:
        raise PreprocessError(f"--append: statistics period {list(period)} differs from the store's {stored}; "
                              f"pass --recompute-statistics to recompute them over the new period")


# ------------------------------------------------------------------------------- statistics
def _statistics(combined: Combined, channels: list[Channel], selection: Selection, period, existing, policy,
                batch_size: int, progress: bool, recompute: bool) -> dict[str, Any]:
    """Statistics of the statistics period (JSON-ready); for an append, the store's unless recomputed."""
    dataset = combined.dataset
    if existing is not None:
        attrs: StoreAttrs = existing["attrs"]
        kept = {"mean": attrs.mean, "std": attrs.std, "tendency_std": attrs.tendency_std,
                "static_mean": attrs.static_mean, "static_std": attrs.static_std,
                "statistics_period": list(attrs.statistics_period)}
        if recompute:
            kept["statistics_period"] = list(period or kept["statistics_period"])
        return kept

    times = dataset["time"].values
    first, last = (period if period is not None else (str(times[0]), str(times[-1])))
    window = dataset.sel(time=slice(_day_start(first), _day_end(last)))
    if window.sizes["time"] < 2:
        raise PreprocessError(f"statistics period {first}..{last} holds {window.sizes['time']} of the written "
                              f"times ({times[0]}..{times[-1]}); expected at least 2")
    try:
        result = channel_statistics(window, channels, batch_size=batch_size, progress=progress)
    except Exception as error:
        raise _read_error(combined, window["time"].values, error) from error
    refused = _refused(result.missing, channels, policy)
    if refused:
        raise _missing_error(refused, "statistics period")
    static_mean, static_std, static_missing = static_statistics(dataset, list(selection.static))
    for name, count in zip(selection.static, static_missing):
        if count and policy.of(name) == "fail":
            raise PreprocessError(f"static variable {name!r} has {count} missing values (NaN or fill value); "
                                  f"expected none. Pass --on-nan fill to replace them with the field mean")
    mean, std = _unscaled_masks(channels, result.mean, result.std)
    _check_positive(std, [c.name for c in channels], static_std, list(selection.static))
    return {"mean": mean, "std": std, "tendency_std": result.tendency_std,
            "static_mean": static_mean, "static_std": static_std,
            "statistics_period": [_iso(window["time"].values[0]), _iso(window["time"].values[-1])]}


def _statistics_from_store(output: Path, channels: list[Channel], static: list[str], period, batch_size: int,
                           progress: bool) -> dict[str, Any]:
    stored = xr.open_zarr(output, consolidated=False)
    window = stored.sel(time=slice(_day_start(period[0]), _day_end(period[1])))
    if window.sizes["time"] < 2:
        raise PreprocessError(f"statistics period {period} holds {window.sizes['time']} times of {output}")
    result = channel_statistics(window, channels, batch_size=batch_size, progress=progress)
    static_mean, static_std, _ = static_statistics(stored, static)
    return {"mean": result.mean, "std": result.std, "tendency_std": result.tendency_std,
            "static_mean": static_mean, "static_std": static_std,
            "statistics_period": [_iso(window["time"].values[0]), _iso(window["time"].values[-1])]}


def _check_positive(std, names, static_std, static_names) -> None:
    for name, value in zip([*names, *static_names], [*std, *static_std]):
        if not value > 0:
            raise PreprocessError(f"channel {name!r} has standard deviation {value} over the statistics period; "
                                  f"normalisation needs a positive value (a constant or empty field?); leave it "
                                  f"out with --variables or the group's flag")


def _day_start(text: str) -> np.datetime64:
    return np.datetime64(text, "ns")


def _day_end(text: str) -> np.datetime64:
    """A bare date means the whole day: up to its last nanosecond."""
    if len(text) <= 10:
        return np.datetime64(text, "D").astype("datetime64[ns]") + np.timedelta64(1, "D") - np.timedelta64(1, "ns")
    return np.datetime64(text, "ns")


def _iso(time: np.datetime64) -> str:
    return str(np.datetime_as_string(time, unit="s"))


def _missing_error(missing: list[MissingField], where: str) -> PreprocessError:
    points = sum(m.count for m in missing)
    return PreprocessError(f"{points} missing values (NaN or fill value) in {len(missing)} fields of the {where}: "
                           f"{describe_missing(missing)}; expected none. Pass --on-nan fill to replace them with "
                           f"the channel mean of the statistics period (normalised value 0), or --on-nan mask to "
                           f"fill them and add a 0/1 mask channel; for every variable, or per variable as "
                           f"--on-nan sst=mask")


def _read_error(combined: Combined, times: np.ndarray, error: Exception) -> InputError:
    sources = combined.sources_between(times[0], times[-1])
    return InputError(f"reading times {times[0]}..{times[-1]} failed ({type(error).__name__}: {error}); "
                      f"they come from {sources}: is one of these files truncated or corrupt?")


# ------------------------------------------------------------------------------- writing
def _encoding(dataset: xr.Dataset, chunks: tuple[int, int]) -> dict[str, dict[str, Any]]:
    encoding = {name: field_encoding(variable.dims, chunks) for name, variable in dataset.data_vars.items()}
    encoding["time"] = dict(TIME_ENCODING)
    return encoding


def _store_attrs(channels, selection: Selection, statistics, tile_grid, step_hours: int, sources,
                 history: list[dict[str, Any]], complete: bool, members: list[int] | None) -> dict[str, Any]:
    attrs = StoreAttrs(
        channels=channels, static_channels=list(selection.static), time_step_hours=step_hours,
        tile_grid=tuple(tile_grid), mean=statistics["mean"], std=statistics["std"],
        tendency_std=statistics["tendency_std"], static_mean=statistics["static_mean"],
        static_std=statistics["static_std"], statistics_period=tuple(statistics["statistics_period"]),
        sources=sources, complete=complete, members=members).to_json()
    return {**attrs, "preprocess": history}


def _filled_static(dataset: xr.Dataset, names: Sequence[str], statistics) -> xr.Dataset:
    return dataset.assign({name: dataset[name].fillna(np.float32(mean))
                           for name, mean in zip(names, statistics["static_mean"])})


def _write_skeleton(output: Path, dataset: xr.Dataset, channels, selection: Selection, statistics, run,
                    existing, tile_grid, chunks) -> None:
    """Arrays over the full time axis (no chunk of dynamic data written yet), coordinates, static fields."""
    dynamic = [name for name in dataset.data_vars if name not in selection.static]
    if existing is None:
        skeleton = _filled_static(dataset, selection.static, statistics)
        members = dataset["member"].values.tolist() if "member" in dataset.dims else None
        skeleton.attrs = _store_attrs(channels, selection, statistics, tile_grid, run["selection"]["time_step_hours"],
                                      [], [{"run": run}], complete=False, members=members)
        skeleton.to_zarr(output, mode="w", compute=False, encoding=_encoding(skeleton, chunks), zarr_format=3,
                         consolidated=False)
        return
    growing = {**existing["raw_attrs"], "complete": False}  # readers refuse the store while it grows
    zarr.open_group(output, mode="r+").attrs.put(growing)
    if xr.open_zarr(output, consolidated=False).sizes["time"] == existing["n_times"]:
        extension = dataset[dynamic]
        extension.attrs = growing  # appending rewrites the root attributes with these
        extension.to_zarr(output, append_dim="time", compute=False, consolidated=False, zarr_format=3)


def _write_batches(output: Path, combined: Combined, channels, statistics, policy: NanPolicy, batch_size: int,
                   offset: int, record: ProgressRecord, progress: bool, after_batch):
    """Region writes of every unfinished batch.

    Returns the batch indices written, the time steps written, the batches skipped and the
    missing fields of all batches (this run's and those recorded by a killed one).
    """
    dataset = combined.dataset
    n_times = dataset.sizes["time"]
    bytes_per_time = sum(dataset[name].nbytes for name in {c.variable for c in channels}) // max(1, n_times)
    done = record.finished_batches()
    batches = [(i, start, min(start + batch_size, n_times)) for i, start in enumerate(range(0, n_times, batch_size))]
    written, written_steps = [], 0
    with tqdm(total=n_times, unit="step", desc=f"writing {output.name}", disable=not progress) as bar:
        bar.update(sum(stop - start for i, start, stop in batches if i in done))
        for index, start, stop in batches:
            if index in done:
                continue
            times = dataset["time"].values[[start, stop - 1]]
            with disk_space_for(output, f"batch {index} (times {_iso(times[0])}..{_iso(times[1])})",
                                (n_times - start) * bytes_per_time):
                done[index] = _write_batch(output, combined, channels, statistics, policy, slice(start, stop), offset)
                record.finish_batch(index, done[index])
            written.append(index)
            written_steps += stop - start
            bar.update(stop - start)
            if after_batch is not None:
                after_batch(index)
    missing = [m for index in sorted(done) for m in done[index]]
    return written, written_steps, len(batches) - len(written), missing


def _write_batch(output: Path, combined: Combined, channels, statistics, policy: NanPolicy, times: slice,
                 offset: int) -> list[MissingField]:
    """One region write of the times ``times``, missing values filled per policy; returns the missing fields."""
    names = list(dict.fromkeys(c.variable for c in channels))
    fill = _fill_values(combined.dataset, channels, statistics)
    batch = combined.dataset[names].isel(time=times)
    missing_counts = {name: batch[name].isnull().sum([d for d in batch[name].dims if d not in ("time", "level")])
                      for name in names}  # per time and level, over the grid and any members
    batch = batch.assign({name: batch[name].fillna(fill[name]) for name in names if policy.of(name) != "fail"})
    batch = batch.drop_vars([c for c in ("member", "level", "latitude", "longitude") if c in batch.coords])
    write = batch.to_zarr(output, region={"time": slice(offset + times.start, offset + times.stop)}, compute=False,
                          consolidated=False, zarr_format=3)
    try:
        _, counts = dask.compute(write, missing_counts)
    except Exception as error:
        if is_disk_full(error):
            raise
        raise _read_error(combined, batch["time"].values, error) from error
    missing = _missing_fields(counts, channels, batch["time"].values)
    refused = _refused(missing, channels, policy)
    if refused:
        raise _missing_error(refused, f"times {batch['time'].values[0]}..{batch['time'].values[-1]}")
    return missing


def _with_mask_fields(combined: Combined, masked: Sequence[str]) -> Combined:
    """The 0/1 mask field (1 where the source has a value) of each masked variable, read with it."""
    masks = {mask_name(name): combined.dataset[name].notnull().astype(np.float32) for name in masked}
    return replace(combined, dataset=combined.dataset.assign(masks)) if masks else combined


def _unscaled_masks(channels: list[Channel], mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """Mask channels keep their 0/1 values after normalisation: mean 0, std 1."""
    is_mask = [c.variable.endswith(MASK_SUFFIX) for c in channels]
    return ([0.0 if m else v for m, v in zip(is_mask, mean)], [1.0 if m else v for m, v in zip(is_mask, std)])


def _refused(missing: list[MissingField], channels: list[Channel], policy: NanPolicy) -> list[MissingField]:
    """The missing fields whose variable's policy is 'fail'."""
    variable_of = {c.name: c.variable for c in channels}
    return [m for m in missing if policy.of(variable_of[m.channel]) == "fail"]


def _fill_values(dataset: xr.Dataset, channels: list[Channel], statistics) -> dict[str, Any]:
    """Channel means as fill values: a scalar per surface variable, a level-indexed array per upper-air one."""
    means: dict[str, dict[int | None, float]] = {}
    for channel, mean in zip(channels, statistics["mean"]):
        means.setdefault(channel.variable, {})[channel.level] = mean
    fill = {}
    for name, by_level in means.items():
        if None in by_level:
            fill[name] = np.float32(by_level[None])
        else:
            levels = dataset["level"].values
            fill[name] = xr.DataArray(np.asarray([by_level[int(level)] for level in levels], np.float32),
                                      dims="level", coords={"level": levels})
    return fill


def _missing_fields(counts: dict[str, xr.DataArray], channels: list[Channel], times: np.ndarray) -> list[MissingField]:
    missing = []
    for t, time in enumerate(times):
        for channel in channels:
            values = counts[channel.variable]
            count = int(values.isel(time=t).sel(level=channel.level) if channel.level is not None
                        else values.isel(time=t))
            if count:
                missing.append(MissingField(channel.name, time, count))
    return missing


def _finalise(output: Path, paths: list[Path], record: ProgressRecord, resumed, statistics, existing,
              missing: list[MissingField], workers: int | None) -> None:
    """Checksums, final attributes with complete=True (the last write), then the records go."""
    run = resumed["run"]
    if "sources" not in resumed:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:  # hashlib releases the GIL
            digests = list(pool.map(input_files.sha256, paths))
        resumed["sources"] = [{"path": str(path), "size": input_files.identity(path)["size"], "sha256": digest}
                              for path, digest in zip(paths, digests)]
        record.write(resumed)
    entry = {"run": run, "missing_values": sum(m.count for m in missing), "missing_fields": len(missing)}
    group = zarr.open_group(output, mode="r+")
    if existing is None:
        attrs = dict(group.attrs)
        sources, history = resumed["sources"], [entry]
    else:
        attrs = existing["raw_attrs"]
        known = {(s["path"], s["sha256"]) for s in attrs["sources"]}
        sources = attrs["sources"] + [s for s in resumed["sources"] if (s["path"], s["sha256"]) not in known]
        history = [*attrs.get("preprocess", []), entry]
    attrs.update({"sources": sources, "preprocess": history, "complete": True,
                  **{key: statistics[key] for key in ("mean", "std", "tendency_std", "static_mean", "static_std")},
                  "statistics_period": list(statistics["statistics_period"])})
    group.attrs.put(attrs)
    record.remove()


# ------------------------------------------------------------------------------- disk space
def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_space_for(output: Path, what: str, needed_bytes: int) -> Iterator[None]:
    """A full disk (or quota) while writing ``what`` becomes one message: the store, what was being
    written, the space the rest needs and the space free. Finished batches are recorded, so a rerun
    after freeing space resumes."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        folder = next(p for p in (output, *output.parents) if p.exists())
        free = shutil.disk_usage(folder).free
        raise PreprocessError(
            f"{output}: no space left on the device ({error.strerror or error}) while writing {what}; the rest of "
            f"the store needs up to {_gib(needed_bytes)} (uncompressed; compression usually saves a third) and "
            f"{_gib(free)} are free on {folder}. Free space, then rerun the same command: it resumes after the last "
            f"finished batch") from None


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------- scheduler
@contextlib.contextmanager
def dask_scheduler(scheduler: str | None, workers: int | None) -> Iterator[None]:
    """The threaded scheduler by default (no process start-up, robust on few cores); 'local' starts a
    dask.distributed cluster of ``workers`` single-threaded processes; anything else is an address."""
    if scheduler in (None, "threads"):
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        with LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster):
            yield
        return
    try:
        client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))  # 30 s by default
    except OSError as error:
        raise PreprocessError(f"--scheduler {scheduler}: cannot connect to a dask scheduler there ({error}); "
                              f"expected an address like tcp://host:8786, 'local' or 'threads'") from error
    with client:
        yield


# ------------------------------------------------------------------------------- summary
def _summary(output: Path, channels, selection: Selection, tile_grid, chunks, started: float, written_bytes: int,
             *, written_batches: int, skipped_batches: int, missing, on_nan: str) -> Summary:
    stored = xr.open_zarr(output, consolidated=False)
    attrs = StoreAttrs.from_json(dict(zarr.open_group(output, mode="r").attrs), store=str(output))
    times = stored["time"].values
    return Summary(
        store=output, channels=[c.name for c in channels], static=list(selection.static),
        levels=sorted(int(v) for v in selection.levels) if selection.upper_air else [],
        first_time=times[0], last_time=times[-1], n_times=times.size, time_step_hours=attrs.time_step_hours,
        grid=(stored.sizes["latitude"], stored.sizes["longitude"]), tile_grid=tuple(tile_grid),
        spatial_chunks=tuple(chunks), statistics_period=tuple(attrs.statistics_period),
        size_on_disk=sum(p.stat().st_size for p in output.rglob("*") if p.is_file()),
        seconds=clock.perf_counter() - started, written_bytes=written_bytes, batches_written=written_batches,
        batches_skipped=skipped_batches, missing=list(missing), on_nan=on_nan, members=attrs.members)


def _summary_of_store(output: Path, run: dict[str, Any]) -> Summary:
    """The summary of a store that an identical earlier run finished: nothing is written again."""
    attrs = StoreAttrs.from_json(dict(zarr.open_group(output, mode="r").attrs), store=str(output))
    selection = run["selection"]
    stored = xr.open_zarr(output, consolidated=False)
    grid = (stored.sizes["latitude"], stored.sizes["longitude"])
    n_batches = math.ceil(run["times"][2] / run["batch_size"])
    return replace(
        _summary(output, attrs.channels, Selection(selection["surface"], selection["upper_air"],
                                                   selection["static"], selection["levels"]),
                 attrs.tile_grid, spatial_chunks(grid, attrs.tile_grid), clock.perf_counter(), 0,
                 written_batches=0, skipped_batches=n_batches, missing=[], on_nan=run["on_nan"]),
        seconds=0.0)
