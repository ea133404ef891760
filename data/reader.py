"""Per-rank tile reader: normalised samples of one spatial tile and channel slice of a store.

Under Jigsaw parallelism a rank's input is exactly its data tile: the latitude rows and
longitude columns of its domain tile, the channels of its tensor slice. :class:`TileReader`
reads those and nothing else. It opens the zarr arrays directly (no xarray or dask on the
hot path: their per-sample graph overhead costs more than the read) and asks zarr for
``array[t:t+lead+1, levels, rows, columns]`` once per variable, so zarr fetches only the
chunks that overlap the tile; with a store chunked for the tile grid those are exactly
the tile's own chunks (see ``data/schema.py``).

Rows are indexed in the store's latitude order (ascending, -90..90). The model grid may
have fewer rows than the store (``model_lat`` < stored rows: the last rows are cropped,
e.g. 721 -> 720 drops the north pole row) or more (the extra rows are padded with zeros,
in normalised units, in every tensor of the sample). The reader takes plain index ranges;
which rank owns which tile and channel slice is decided by the launcher.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr
from zarr.core.buffer import default_buffer_prototype

from data.schema import StoreAttrs, StoreError
from data.time_features import N_TIME_FEATURES, time_features

CPU_BUFFER = default_buffer_prototype()
UPPER_AIR_DIMS = ("time", "level", "latitude", "longitude")
SURFACE_DIMS = ("time", "latitude", "longitude")
STATIC_DIMS = ("latitude", "longitude")


class ChunkAlignmentWarning(UserWarning):
    """The tile does not consist of whole chunks, so every sample reads bytes it discards."""


@dataclass(frozen=True)
class Sample:
    """One training/forecast sample of a rank's tile and channel slice, normalised.

    Shapes use the tile's rows ``lat`` and columns ``lon``, its channels ``C``, static
    channels ``S`` and ``F`` = 4 time features (``data/time_features.py``).
    """

    inputs: torch.Tensor  # (lat, lon, C) state at ``time``; a view of channel-first memory
    targets: torch.Tensor  # (lead, lat, lon, C) states at time + k * step, k = 1..lead; likewise
    static: torch.Tensor  # (lat, lon, S) shared by all samples of a reader; do not modify
    forcings: torch.Tensor  # (lead + 1, lat, lon, F) time features at the input and each target time
    time: np.datetime64  # valid time of the inputs
    time_index: int  # index of ``time`` on the store's time axis


@dataclass(frozen=True)
class ChunkAlignment:
    """Bytes one sample time step needs (the tile) against the bytes zarr fetches for it.

    ``fetched_bytes`` counts the data (uncompressed) of every chunk the tile overlaps: zarr
    reads and decodes a whole chunk for any overlap. Edge chunks count their valid part
    only; zarr v3 stores them padded to full chunk size, padding that compresses to almost
    nothing but that an uncompressed store reads too.
    """

    tile_bytes: int
    fetched_bytes: int
    misaligned: tuple[str, ...]  # "variable chunks (...)" for each variable that over-reads

    @property
    def aligned(self) -> bool:
        return self.fetched_bytes == self.tile_bytes

    @property
    def wasted_fraction(self) -> float:
        """Share of the fetched bytes that lie outside the tile (0 when aligned)."""
        return 0.0 if self.fetched_bytes == 0 else 1.0 - self.tile_bytes / self.fetched_bytes


@dataclass(frozen=True)
class _VariableRead:
    """How one variable's channels are read and where they land on the channel axis."""

    name: str
    array: zarr.Array
    positions: np.ndarray  # output channel positions, in the order of ``levels``
    levels: slice | np.ndarray | None  # level indices (ascending); None for surface variables

    @property
    def channels(self) -> slice | None:
        """The output positions as a slice when they are consecutive and ascending, else None."""
        first = int(self.positions[0])
        if np.array_equal(self.positions, np.arange(first, first + len(self.positions))):
            return slice(first, first + len(self.positions))
        return None


class TileReader:
    """Reads normalised samples of one tile (rows x columns) and channel slice from a store.

    Args:
        store: path (or URL zarr understands) of a store that follows ``data/schema.py``.
        lat_range: ``(first, stop)`` rows of the model grid, store latitude order.
        lon_range: ``(first, stop)`` longitude columns.
        channels: indices into ``StoreAttrs.channels`` for this rank's tensor slice, in the
            order wanted on the channel axis; None reads all channels.
        static_channels: indices into ``StoreAttrs.static_channels``; None reads all.
        model_lat: rows of the model grid (default: the store's). Rows at or beyond the
            store's latitude count are zero; a tile must lie within the model grid.
        dtype: floating dtype of the returned tensors (normalisation runs in float32).
        pin_memory: return page-locked tensors for asynchronous host-to-device copies
            (needs an accelerator).
        normalize: False returns ``inputs`` and ``targets`` in physical units and leaves the
            normalisation to the caller (:meth:`normalize_`, e.g. on the GPU, which saves
            the host two passes over every sample); padded rows are zero either way.

    The store contract is verified on open; a store that breaks it raises
    :class:`~data.schema.StoreError` naming the store and what is wrong. A tile that is not
    made of whole chunks works but warns (:class:`ChunkAlignmentWarning`) with the share
    of bytes it wastes; the numbers are in :attr:`alignment`.
    """

    def __init__(self, store: str | Path, *, lat_range: tuple[int, int], lon_range: tuple[int, int],
                 channels: Sequence[int] | None = None, static_channels: Sequence[int] | None = None,
                 model_lat: int | None = None, dtype: torch.dtype = torch.float32,
                 pin_memory: bool = False, normalize: bool = True, member: int | None = None) -> None:
        self.store = str(store)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"TileReader: dtype must be a floating torch dtype, got {dtype!r}")
        if pin_memory and not torch.accelerator.is_available():
            raise ValueError("TileReader: pin_memory=True needs an accelerator (none is available); "
                             "pass pin_memory=False on CPU-only machines")
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.normalize = normalize
        # what opens the same reader elsewhere (e.g. in a reader process: data.process_prefetch)
        self.arguments = dict(store=self.store, lat_range=tuple(lat_range), lon_range=tuple(lon_range),
                              channels=None if channels is None else list(channels),
                              static_channels=None if static_channels is None else list(static_channels),
                              model_lat=model_lat, dtype=dtype, pin_memory=pin_memory, normalize=normalize,
                              member=member)

        group = _open_group(self.store)
        self.attrs = StoreAttrs.from_json(dict(group.attrs), store=self.store)
        if not self.attrs.complete:
            raise StoreError(f"{self.store}: store is incomplete (root attribute 'complete' is not true): "
                             f"the preprocessing run that wrote it did not finish. Rerun the preprocessing "
                             f"(launch/preprocess.py) for this store before reading it.")
        self.ensemble = bool(self.attrs.members)
        self.use_member(member)
        _check_statistics(self.attrs, self.store)

        latitudes = _coordinate(group, "latitude", self.store)
        longitudes = _coordinate(group, "longitude", self.store)
        self.times = _decode_times(group, self.store)
        self.step_hours = self.attrs.time_step_hours
        _check_time_axis(self.times, self.step_hours, self.store)
        self._step = np.timedelta64(self.step_hours, "h")

        n_store_lat = len(latitudes)
        self.model_lat = n_store_lat if model_lat is None else int(model_lat)
        if self.model_lat < 1:
            raise ValueError(f"TileReader: model_lat must be positive, got {model_lat}")
        self.lat_range = _check_range(lat_range, self.model_lat, "lat_range", "model grid rows (model_lat)")
        self.lon_range = _check_range(lon_range, len(longitudes), "lon_range", f"longitudes of {self.store}")
        lat0, lat1 = self.lat_range
        lon0, lon1 = self.lon_range
        # rows of the tile that exist in the store; the rest (model_lat beyond the store) are zero
        self._stored_rows = max(0, min(lat1, n_store_lat) - lat0)
        self._rows = slice(lat0, lat0 + self._stored_rows)
        self._columns = slice(lon0, lon1)
        self.tile_shape = (lat1 - lat0, lon1 - lon0)
        self.latitudes = latitudes[self._rows]  # stored rows of the tile only
        self.longitudes = longitudes[self._columns]

        self._select_channels(channels, static_channels)
        self._reads = _plan_reads(group, self.attrs, self.channel_indices, self.store, self.ensemble)
        self.alignment = _alignment(self._reads, self._rows, self._columns, self.ensemble)
        if not self.alignment.aligned:
            warnings.warn(
                f"{self.store}: tile rows [{lat0}, {lat1}) x columns [{lon0}, {lon1}) is not made of whole "
                f"chunks ({'; '.join(self.alignment.misaligned)}): every sample fetches "
                f"{self.alignment.fetched_bytes} bytes per time step for a {self.alignment.tile_bytes}-byte tile "
                f"(wasted fraction {self.alignment.wasted_fraction:.3f}). Preprocess the store with spatial "
                f"chunks of the model grid's tile size for this domain decomposition.",
                ChunkAlignmentWarning, stacklevel=2)
        self._static = self._read_static(group)

    def use_member(self, member: int | None) -> None:
        """Read ensemble member ``member`` (an index into the store's ``members``) from now on; a
        store with a member dimension needs one, a store without takes None."""
        members = self.attrs.members or []
        if not self.ensemble and member is not None:
            raise StoreError(f"{self.store}: member {member} asked for, but the store has no member dimension")
        if self.ensemble and (member is None or not 0 <= int(member) < len(members)):
            raise StoreError(f"{self.store}: an ensemble store of {len(members)} members (a 'member' dimension): "
                             f"expected a member index 0..{len(members) - 1} (a forecast's --initial-members, or "
                             f"preprocess with --member N), got {member}")
        self.member = None if member is None else int(member)
        if hasattr(self, "arguments"):
            self.arguments["member"] = self.member

    def _select_channels(self, channels: Sequence[int] | None, static_channels: Sequence[int] | None) -> None:
        """The channels this reader reads, their names and normalisation constants."""
        self.channel_indices = _check_indices(channels, len(self.attrs.channels), "channels",
                                              f"channels of {self.store}")
        self.static_indices = _check_indices(static_channels, len(self.attrs.static_channels), "static_channels",
                                             f"static channels of {self.store}")
        self.channel_names = [self.attrs.channels[i].name for i in self.channel_indices]
        self.static_names = [self.attrs.static_channels[i] for i in self.static_indices]
        self._mean = np.asarray([self.attrs.mean[i] for i in self.channel_indices], dtype=np.float32)
        self._inv_std = np.asarray([1.0 / self.attrs.std[i] for i in self.channel_indices], dtype=np.float32)
        # normalize_into's offset: -mean / std, rounded once
        self._shift = np.asarray([-self.attrs.mean[i] / self.attrs.std[i] for i in self.channel_indices],
                                 dtype=np.float32)

    # ------------------------------------------------------------------ public API
    @property
    def n_channels(self) -> int:
        return len(self.channel_indices)

    def static(self) -> torch.Tensor:
        """Normalised static fields of the tile, ``(lat, lon, S)`` (read once, on open)."""
        return self._static

    def buffer_shapes(self, lead_steps: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the float32 ``(fields, forcings)`` memory a sample of ``lead_steps`` fills:
        ``(lead + 1, C, lat, lon)`` channel-first fields and ``(lead + 1, lat, lon, F)``."""
        n_times = int(lead_steps) + 1
        return (n_times, self.n_channels, *self.tile_shape), (n_times, *self.tile_shape, N_TIME_FEATURES)

    def sample(self, time_index: int, lead_steps: int = 1,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Sample:
        """The state at ``time_index`` and the ``lead_steps`` following states, normalised.

        Target ``k`` is the state ``k`` store time steps later. ``lead_steps=0`` gives the
        inputs alone (an initial condition for a forecast). The window must not span a gap
        in the time axis (see ``data.sampler.valid_time_indices``). ``out``: contiguous
        float32 CPU tensors ``(fields, forcings)`` of :meth:`buffer_shapes` to read into
        instead of new memory (shared or page-locked slots); the sample's ``inputs``,
        ``targets`` and ``forcings`` are then views of them (with the reader's float32 dtype).
        """
        time_index, lead_steps = int(time_index), int(lead_steps)
        if lead_steps < 0:
            raise ValueError(f"TileReader.sample: lead_steps must be >= 0, got {lead_steps}")
        last = time_index + lead_steps
        if time_index < 0 or last >= len(self.times):
            raise IndexError(f"{self.store}: time index {time_index} with {lead_steps} lead steps needs time "
                             f"indices {time_index}..{last}, the store has 0..{len(self.times) - 1}")
        window = self.times[time_index:last + 1]
        if window[-1] - window[0] != lead_steps * self._step:
            raise ValueError(f"{self.store}: time indices {time_index}..{last} ({window[0]} .. {window[-1]}) span a "
                             f"gap in the time axis (step {self.step_hours} h); draw indices with "
                             f"data.sampler.valid_time_indices")

        fields_shape, forcings_shape = self.buffer_shapes(lead_steps)
        if out is None:
            fields, forcings = self._new_fields(fields_shape), torch.empty(forcings_shape, dtype=torch.float32)
        else:
            fields, forcings = out
            for name, tensor, shape in (("fields", fields, fields_shape), ("forcings", forcings, forcings_shape)):
                if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or not tensor.is_contiguous() \
                        or tensor.device.type != "cpu":
                    raise ValueError(f"TileReader.sample: out {name} must be a contiguous float32 CPU tensor of "
                                     f"shape {shape}, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
            fields[:, :, self._stored_rows:] = 0
        self._read_fields(slice(time_index, last + 1), fields)
        self.time_features(window, out=forcings.numpy())
        return self.as_sample((fields, forcings), time_index)

    def time_features(self, times: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The time features of this tile at ``times``: float32 ``(len(times), tile lat, tile lon, F)``
        (into ``out`` when given); padded rows zero."""
        if out is None:
            out = np.empty((len(times), self.tile_shape[0], len(self.longitudes), N_TIME_FEATURES), np.float32)
        out[:, self._stored_rows:] = 0
        for k, time in enumerate(times):
            out[k, :self._stored_rows] = time_features(time, self.longitudes, self._stored_rows)
        return out

    def as_sample(self, out: tuple[torch.Tensor, torch.Tensor], time_index: int) -> Sample:
        """The :class:`Sample` of memory ``out`` = ``(fields, forcings)`` that :meth:`sample` filled
        for ``time_index`` (here or in another process); its tensors are views of ``out`` (copies
        when the reader's dtype or page-locking differ from ``out``'s)."""
        fields, forcings = out
        fields = fields.permute(0, 2, 3, 1)  # channel-last views
        return Sample(inputs=self._tensor(fields[0]), targets=self._tensor(fields[1:]), static=self._static,
                      forcings=self._tensor(forcings), time=self.times[int(time_index)], time_index=int(time_index))

    def normalize_into(self, fields: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Normalise raw ``inputs`` or ``targets`` (``(..., lat, lon, C)``, any device and memory
        layout) into ``out`` (the same shape and device; any floating dtype and layout; ``fields``
        itself for in place) in one pass, ``fields / std - mean / std``, as the reader does with
        ``normalize`` on to within float32 rounding; padded rows of ``out`` are zero. Returns ``out``.

        One pass matters on the GPU: a 0.25 deg sample is ~0.3 GB of float32 fields, and the
        subtraction, the multiplication and the cast to bfloat16 as three passes move ~1.6 GB."""
        scale = torch.from_numpy(self._inv_std).to(fields.device, non_blocking=True)
        shift = torch.from_numpy(self._shift).to(fields.device, non_blocking=True)
        rows = self._stored_rows
        torch.addcmul(shift, fields[..., :rows, :, :], scale, out=out[..., :rows, :, :])
        out[..., rows:, :, :] = 0
        return out

    def __repr__(self) -> str:
        return (f"TileReader({self.store!r}, lat_range={self.lat_range}, lon_range={self.lon_range}, "
                f"channels={len(self.channel_indices)}/{len(self.attrs.channels)}, "
                f"static={len(self.static_indices)}/{len(self.attrs.static_channels)}, times={len(self.times)})")

    # ------------------------------------------------------------------ reading
    def _new_fields(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Memory for one sample's fields; padded rows zero."""
        if self.pin_memory:  # recycled page-locked blocks: zero only the padded rows
            fields = torch.empty(shape, dtype=torch.float32, pin_memory=True)
            fields[:, :, self._stored_rows:] = 0
            return fields
        return torch.zeros(shape, dtype=torch.float32)  # fresh pageable memory: zero pages fault in cheaper

    def _read_fields(self, times: slice, fields: torch.Tensor) -> None:
        """Read ``(time, C, lat, lon)`` float32 fields into ``fields`` (channel-first), normalised
        unless ``normalize`` is off; the padded rows are left as they are (zero).

        Channel-first, so that each variable's levels are a block of whole planes: zarr
        decodes straight into the buffer (no transposing scatter, which cost twice the zarr
        decode at 0.25 deg); callers see channel-last views and the device makes them
        contiguous. All variables are read concurrently on an event loop of the calling
        thread: zarr's synchronous API runs every caller's chunk copies on one shared loop
        thread, which capped several prefetch threads together at ~4 samples/s at 0.25 deg.
        """
        if self._stored_rows == 0:
            return
        stored = fields.numpy()[:, :, :self._stored_rows]
        _run_to_completion(self._read_variables(times, stored))
        if self.normalize:
            stored -= self._mean[:, None, None]
            stored *= self._inv_std[:, None, None]

    async def _read_variables(self, times: slice, stored: np.ndarray) -> None:
        await asyncio.gather(*(self._read_variable(read, times, stored) for read in self._reads))

    async def _read_variable(self, read: _VariableRead, times: slice, stored: np.ndarray) -> None:
        array = read.array.async_array
        member = () if self.member is None else (self.member,)
        if read.levels is None:
            selection, channels = (times, *member, self._rows, self._columns), int(read.positions[0])
        else:
            selection, channels = (times, *member, read.levels, self._rows, self._columns), read.channels
        if channels is None:  # levels scattered over the channel axis
            stored[:, read.positions] = await array.get_orthogonal_selection(selection)
        else:  # one channel or a block of consecutive channels: decode in place
            destination = CPU_BUFFER.nd_buffer.from_numpy_array(stored[:, channels])
            await array.get_orthogonal_selection(selection, out=destination)

    def _read_static(self, group: zarr.Group) -> torch.Tensor:
        static = np.zeros((*self.tile_shape, len(self.static_indices)), dtype=np.float32)
        for position, index in enumerate(self.static_indices):
            name = self.attrs.static_channels[index]
            array = _array(group, name, STATIC_DIMS, self.store)
            values = np.asarray(array[self._rows, self._columns], dtype=np.float32)
            static[:self._stored_rows, :, position] = (
                (values - np.float32(self.attrs.static_mean[index])) / np.float32(self.attrs.static_std[index]))
        return self._tensor(torch.from_numpy(static))

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """In the reader's dtype (keeping the memory layout), page-locked when asked."""
        if self.dtype != torch.float32:
            tensor = tensor.to(self.dtype)
        return tensor.pin_memory() if self.pin_memory and not tensor.is_pinned() else tensor


def _run_to_completion(coroutine) -> None:
    """Run ``coroutine`` on a fresh event loop in this thread, or in a helper thread when this
    thread already runs a loop (a notebook, an async application)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


# ---------------------------------------------------------------------- store checks
def _open_group(store: str) -> zarr.Group:
    try:
        group = zarr.open_group(store, mode="r")
    except Exception as error:  # zarr raises several types for "not there / not a group"
        raise StoreError(f"{store}: cannot open as a zarr group ({type(error).__name__}: {error})") from error
    if group.metadata.zarr_format != 3:
        raise StoreError(f"{store}: zarr format {group.metadata.zarr_format}, the store contract needs zarr v3")
    return group


def _array(group: zarr.Group, name: str, dims: tuple[str, ...], store: str) -> zarr.Array:
    if name not in group:
        raise StoreError(f"{store}: variable {name!r} missing (the root attributes list it)")
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{store}: {name!r} is a group, expected an array with dims {dims}")
    found = array.metadata.dimension_names
    if found is None or tuple(found) != dims:
        raise StoreError(f"{store}: variable {name!r} has dims {found}, expected {dims}")
    return array


def _coordinate(group: zarr.Group, name: str, store: str) -> np.ndarray:
    values = _array(group, name, (name,), store)[:]
    if len(values) == 0:
        raise StoreError(f"{store}: coordinate {name!r} is empty")
    if len(values) > 1 and not np.all(np.diff(values) > 0):
        raise StoreError(f"{store}: coordinate {name!r} must be strictly ascending "
                         f"(latitude -90..90, longitude 0..360, levels in hPa)")
    if name == "longitude" and (values[0] < 0 or values[-1] >= 360):
        raise StoreError(f"{store}: longitude must lie in [0, 360), found {values[0]} .. {values[-1]}")
    return values


def _decode_times(group: zarr.Group, store: str) -> np.ndarray:
    raw = _array(group, "time", ("time",), store)
    decoded = xr.decode_cf(xr.Dataset(coords={"time": ("time", raw[:], dict(raw.attrs))}))["time"].values
    if not np.issubdtype(decoded.dtype, np.datetime64):
        raise StoreError(f"{store}: coordinate 'time' does not decode to datetimes (attributes {dict(raw.attrs)})")
    times = decoded.astype("datetime64[ns]")
    times.setflags(write=False)
    return times


def _check_time_axis(times: np.ndarray, step_hours: int, store: str) -> None:
    """Ascending, on multiples of the step; longer differences are gaps (allowed, skipped by samplers)."""
    step = np.timedelta64(step_hours, "h")
    differences = np.diff(times)
    bad = np.flatnonzero((differences <= np.timedelta64(0, "ns")) | (differences % step != np.timedelta64(0, "ns")))
    if bad.size:
        i = int(bad[0])
        raise StoreError(f"{store}: time axis must ascend in multiples of time_step_hours={step_hours}; "
                         f"time[{i}]={times[i]} is followed by time[{i + 1}]={times[i + 1]}")


def _check_statistics(attrs: StoreAttrs, store: str) -> None:
    for key, values, n in (("mean", attrs.mean, len(attrs.channels)), ("std", attrs.std, len(attrs.channels)),
                           ("static_mean", attrs.static_mean, len(attrs.static_channels)),
                           ("static_std", attrs.static_std, len(attrs.static_channels))):
        if len(values) != n:
            raise StoreError(f"{store}: root attribute {key!r} has {len(values)} values, expected {n} "
                             f"(one per {'static ' if key.startswith('static') else ''}channel)")
        if not np.all(np.isfinite(values)):
            raise StoreError(f"{store}: root attribute {key!r} holds non-finite values")
    names = [c.name for c in attrs.channels] + list(attrs.static_channels)
    for i, std in enumerate(list(attrs.std) + list(attrs.static_std)):
        if std <= 0:
            raise StoreError(f"{store}: standard deviation of channel {names[i]!r} is {std}; "
                             f"normalisation needs a positive value")


def _check_range(bounds: tuple[int, int], size: int, name: str, what: str) -> tuple[int, int]:
    first, stop = (int(b) for b in bounds)
    if not 0 <= first < stop <= size:
        raise ValueError(f"TileReader: {name}={tuple(bounds)} must satisfy 0 <= first < stop <= {size} ({what})")
    return first, stop


def _check_indices(indices: Sequence[int] | None, size: int, name: str, what: str) -> list[int]:
    if indices is None:
        return list(range(size))
    indices = [int(i) for i in indices]
    outside = [i for i in indices if not 0 <= i < size]
    if outside:
        raise ValueError(f"TileReader: {name} {outside} outside 0..{size - 1} ({size} {what})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"TileReader: {name} {indices} repeat an index")
    return indices


def _plan_reads(group: zarr.Group, attrs: StoreAttrs, channel_indices: list[int], store: str,
                ensemble: bool = False) -> list[_VariableRead]:
    """One read per variable: its selected levels (ascending) and their output positions."""
    member = ("member",) if ensemble else ()
    by_variable: dict[str, list[tuple[int | None, int]]] = {}
    for position, index in enumerate(channel_indices):
        channel = attrs.channels[index]
        by_variable.setdefault(channel.variable, []).append((channel.level, position))

    level_index: dict[int, int] = {}
    if any(level is not None for members in by_variable.values() for level, _ in members):
        level_index = {int(level): i for i, level in enumerate(_coordinate(group, "level", store))}

    reads = []
    for name, members in by_variable.items():
        if members[0][0] is None:
            array = _array(group, name, (SURFACE_DIMS[0], *member, *SURFACE_DIMS[1:]), store)
            reads.append(_VariableRead(name, array, np.asarray([p for _, p in members]), None))
            continue
        array = _array(group, name, (UPPER_AIR_DIMS[0], *member, *UPPER_AIR_DIMS[1:]), store)
        missing = [level for level, _ in members if level not in level_index]
        if missing:
            raise StoreError(f"{store}: levels {missing} of variable {name!r} missing from coordinate 'level' "
                             f"{sorted(level_index)}")
        members = sorted(members, key=lambda member: level_index[member[0]])
        indices = np.asarray([level_index[level] for level, _ in members])
        contiguous = np.all(np.diff(indices) == 1)
        levels = slice(int(indices[0]), int(indices[-1]) + 1) if contiguous else indices
        reads.append(_VariableRead(name, array, np.asarray([p for _, p in members]), levels))
    return reads


def _fetched(first: int, stop: int, chunk: int, size: int) -> int:
    """Elements along one axis of the chunks covering ``[first, stop)`` (edge chunk: its valid part)."""
    return min(math.ceil(stop / chunk) * chunk, size) - first // chunk * chunk if stop > first else 0


def _alignment(reads: list[_VariableRead], rows: slice, columns: slice, ensemble: bool = False) -> ChunkAlignment:
    tile_bytes = fetched_bytes = 0
    misaligned = []
    for read in reads:
        chunks, shape = read.array.chunks, read.array.shape
        itemsize = read.array.dtype.itemsize
        plane = (rows.stop - rows.start) * (columns.stop - columns.start)
        fetched_plane = (_fetched(rows.start, rows.stop, chunks[-2], shape[-2])
                         * _fetched(columns.start, columns.stop, chunks[-1], shape[-1]))
        if read.levels is None:
            n_levels = fetched_levels = 1
        else:
            indices = np.arange(read.levels.start, read.levels.stop) if isinstance(read.levels, slice) else read.levels
            n_levels = len(indices)
            axis = 2 if ensemble else 1  # the level axis follows time (and member)
            fetched_levels = sum(min(chunks[axis], shape[axis] - c * chunks[axis])
                                 for c in np.unique(indices // chunks[axis]))
        # one time index touches one time chunk, all of it
        variable_tile = n_levels * plane * itemsize
        variable_fetched = min(chunks[0], shape[0]) * fetched_levels * fetched_plane * itemsize
        tile_bytes += variable_tile
        fetched_bytes += variable_fetched
        if variable_fetched != variable_tile:
            misaligned.append(f"{read.name} chunks {tuple(chunks)}")
    return ChunkAlignment(tile_bytes, fetched_bytes, tuple(misaligned))
