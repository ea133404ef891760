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
class ChannelStatistics:
    mean: list[float]
    std: list[float]
    tendency_std: list[float]


def field_moments(field: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Lazy float64 mean and sum of squared deviations of every 2-D field (over latitude, longitude)."""
    values = field.astype(np.float64)
    mean = values.mean(SPATIAL)
    return mean, ((values - mean) ** 2).sum(SPATIAL)


def pool_moments(means: np.ndarray, m2: np.ndarray, field_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over all fields along axis 0 from per-field means and M2 (equal-size fields)."""
    mean = means.mean(axis=0)
    total_m2 = m2.sum(axis=0) + field_size * ((means - mean) ** 2).sum(axis=0)
    return mean, total_m2 / (field_size * means.shape[0])


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
    parts: dict[str, list[list[np.ndarray]]] = {name: [[], [], [], []] for name in variables}
    with tqdm(total=n_times, unit="step", desc="statistics", disable=not progress) as bar:
        for start in range(0, n_times, batch_size):
            stop = min(start + batch_size, n_times)
            window = dataset[variables].isel(time=slice(start, min(stop + 1, n_times)))
            lazy = {}
            for name in variables:
                field = window[name]
                lazy[name] = (*field_moments(field.isel(time=slice(0, stop - start))),
                              *field_moments(field.diff("time")))
            (computed,) = dask.compute(lazy)
            for name, moments in computed.items():
                for part, values in zip(parts[name], moments):
                    part.append(values.values)
            bar.update(stop - start)

    mean, std, tendency_std = [], [], []
    for channel in channels:
        field_mean, field_m2, tendency_mean, tendency_m2 = (np.concatenate(p) for p in parts[channel.variable])
        if channel.level is not None:
            level = list(dataset["level"].values).index(channel.level)
            field_mean, field_m2, tendency_mean, tendency_m2 = (
                a[:, level] for a in (field_mean, field_m2, tendency_mean, tendency_m2))
        channel_mean, variance = pool_moments(field_mean, field_m2, field_size)
        _, tendency_variance = pool_moments(tendency_mean, tendency_m2, field_size)
        mean.append(float(channel_mean))
        std.append(float(np.sqrt(variance)))
        tendency_std.append(float(np.sqrt(tendency_variance)))
    return ChannelStatistics(mean, std, tendency_std)


def static_statistics(dataset: xr.Dataset, names: Sequence[str]) -> tuple[list[float], list[float]]:
    """Mean and std (float64, ddof=0) of each static field."""
    means, stds = [], []
    for name in names:
        mean, m2 = (np.asarray(a) for a in dask.compute(*field_moments(dataset[name])))
        _, variance = pool_moments(mean[None], m2[None], dataset[name].size)
        means.append(float(mean))
        stds.append(float(np.sqrt(variance)))
    return means, stds
