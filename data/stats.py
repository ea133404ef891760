"""Normalisation statistics of a store: per-channel mean, std and std of one-step tendencies.

Numerically stable by construction: every 2-D field (one time, one level) gets its own
float64 mean and sum of squared deviations from that mean (a two-pass computation over
one field, which dask holds in memory anyway), and the per-field moments are pooled
exactly with the parallel-variance formula of Chan, Golub and LeVeque:

    mean = mean_i(m_i)            M2 = sum_i(M2_i) + n * sum_i((m_i - mean)^2)

(all fields have the same size ``n``). No large sum of squares is ever formed, so a
channel such as ``msl`` (mean ~1e5 Pa, std ~1e3 Pa) keeps its digits, and the result
does not depend on how time is split into batches. Statistics are unweighted (every grid
point counts once) and population statistics (ddof=0), as in ``numpy.std``. The tendency
of a channel is ``x(t + step) - x(t)`` for consecutive store times, counted when both
times lie in the statistics period.

An ensemble's members are pooled like more fields of the same channel (one mean and std
per channel over all members), and each member's tendency is its own.

Missing values (NaN, which is what netCDF fill values decode to) are left out, as in
``numpy.nanmean``/``numpy.nanstd``: each field carries its count of valid points and the
pooling weights fields by it. The fields that had missing values are reported, so the
caller can refuse or fill them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from data.schema import Channel

SPATIAL = ("latitude", "longitude")


@dataclass(frozen=True)
class MissingField:
    """A 2-D field with missing values: channel name (``t850``), valid time and number of points."""

    channel: str
    time: np.datetime64
    count: int


@dataclass(frozen=True)
class ChannelStatistics:
    mean: list[float]
    std: list[float]
    tendency_std: list[float]
    missing: list[MissingField]  # fields of the period with missing values, in time then channel order


def field_moments(field: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Lazy valid-point count, float64 mean and sum of squared deviations of every 2-D field.

    Missing values are skipped; a field without valid points has count 0, mean 0 and M2 0.
    """
    values = field.astype(np.float64)
    count = values.notnull().sum(SPATIAL)
    mean = values.mean(SPATIAL, skipna=True).fillna(0.0)
    return count, mean, ((values - mean) ** 2).sum(SPATIAL, skipna=True)


def pool_moments(counts: np.ndarray, means: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over all fields along axis 0 from per-field counts, means and M2.

    A channel without any valid point gets NaN mean and variance.
    """
    counts = counts.astype(np.float64)
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (counts * means).sum(axis=0) / total
        total_m2 = m2.sum(axis=0) + (counts * (means - mean) ** 2).sum(axis=0)
        return mean, total_m2 / total


def channel_statistics(dataset: xr.Dataset, channels: Sequence[Channel], *, batch_size: int,
                       progress: bool = True) -> ChannelStatistics:
    """Statistics of ``channels`` over all times of ``dataset`` (already cut to the statistics period).

    Reads the data once, ``batch_size`` times at a time; each batch also reads the time
    after it, for the tendency that crosses into the next batch.
    """
    n_times = dataset.sizes["time"]
    if n_times < 2:
        raise ValueError(f"the statistics period holds {n_times} time step(s); tendency statistics need at least 2")
    variables = list(dict.fromkeys(channel.variable for channel in channels))
    field_size = dataset.sizes["latitude"] * dataset.sizes["longitude"]
    parts: dict[str, list[list[np.ndarray]]] = {name: [[], [], [], [], [], []] for name in variables}
    with tqdm(total=n_times, unit="step", desc="statistics", disable=not progress) as bar:
        for start in range(0, n_times, batch_size):
            stop = min(start + batch_size, n_times)
            window = dataset[variables].isel(time=slice(start, min(stop + 1, n_times)))
            lazy = {}
            for name in variables:
                field = window[name]
                lazy[name] = (*field_moments(field.isel(time=slice(0, stop - start))),
                              *field_moments(field.astype(np.float64).diff("time")))  # exact differences
            (computed,) = dask.compute(lazy)
            for name, moments in computed.items():
                for part, values in zip(parts[name], moments):
                    part.append(_fields_first(values))
            bar.update(stop - start)

    times = np.repeat(dataset["time"].values, dataset.sizes.get("member", 1))  # time of each field row
    mean, std, tendency_std, missing = [], [], [], []
    for channel in channels:
        moments = [np.concatenate(p) for p in parts[channel.variable]]
        if channel.level is not None:
            level = list(dataset["level"].values).index(channel.level)
            moments = [a[:, level] for a in moments]
        count, field_mean, field_m2, tendency_count, tendency_mean, tendency_m2 = moments
        channel_mean, variance = pool_moments(count, field_mean, field_m2)
        _, tendency_variance = pool_moments(tendency_count, tendency_mean, tendency_m2)
        mean.append(float(channel_mean))
        std.append(float(np.sqrt(variance)))
        tendency_std.append(float(np.sqrt(tendency_variance)))
        missing += [MissingField(channel.name, times[i], int(field_size - count[i]))
                    for i in np.flatnonzero(count < field_size)]
    missing.sort(key=lambda field: field.time)  # stable: channel order within a time
    return ChannelStatistics(mean, std, tendency_std, missing)


def _fields_first(moments: xr.DataArray) -> np.ndarray:
    """Per-field moments as rows ``(time[, member]) x levels``: an ensemble's members pool like more times."""
    if "member" not in moments.dims:
        return moments.values
    moments = moments.transpose("time", "member", ...)
    return moments.values.reshape(-1, *moments.shape[2:])


def static_statistics(dataset: xr.Dataset, names: Sequence[str]) -> tuple[list[float], list[float], list[int]]:
    """Mean, std (float64, ddof=0) and number of missing points of each static field."""
    means, stds, missing = [], [], []
    for name in names:
        count, mean, m2 = (np.asarray(a) for a in dask.compute(*field_moments(dataset[name])))
        _, variance = pool_moments(count[None], mean[None], m2[None])
        means.append(float(mean) if count else float("nan"))
        stds.append(float(np.sqrt(variance)))
        missing.append(int(dataset[name].size - count))
    return means, stds, missing
