"""Scores of a forecast store against a data store's truth, and of two baselines.

For every channel (variable and level) and lead time, over the init times whose valid time
``init + lead`` is on the store's time axis:

* **model**: the forecast;
* **persistence**: the state at the init time, kept for every lead (scores zero at lead 0);
* **climatology**: the per-grid-point mean over the climatology period at the valid time's
  day of year and hour of day, smoothed over a window of days (:class:`Climatology`).

Scores are latitude-weighted RMSE, MAE, bias and ACC (anomalies against the same
climatology) from :mod:`weathermixer.metrics`; the climatology baseline has no ACC (its
anomaly is zero). An ensemble forecast (a ``realization`` dim) is scored by its mean and
also gets the fair CRPS, the spread/skill ratio and the rank histogram. Fields are read one
lead at a time, so memory stays at a few fields per channel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from data.schema import StoreAttrs, StoreError
from data.forecast_store import SHORT_NAMES, open_forecast, wb2_name
from launch.inference.forecaster import DATETIME_PATTERN
from weathermixer import metrics

METHODS = ("model", "persistence", "climatology")
SCORES = ("rmse", "mae", "bias", "acc")
ENSEMBLE_SCORES = ("crps", "spread", "spread_skill", "rank_histogram")


@dataclass(frozen=True)
class ScoredChannel:
    variable: str  # WeatherBench2 name, as in the forecast store
    level: int | None

    @property
    def store_variable(self) -> str:
        return SHORT_NAMES.get(self.variable, self.variable)

    @property
    def name(self) -> str:
        """``z500``, ``t2m``: the short channel name of the data store."""
        return self.store_variable if self.level is None else f"{self.store_variable}{self.level}"

    def select(self, array: xr.DataArray) -> xr.DataArray:
        return array if self.level is None else array.sel(level=self.level)


def forecast_channels(forecast: xr.Dataset) -> list[ScoredChannel]:
    """The channels a forecast holds: its ``channels`` attribute (our forecasts, where an
    upper-air variable may lack some levels), else every variable at every level."""
    if "channels" in forecast.attrs:
        return [ScoredChannel(wb2_name(c["variable"]), c["level"]) for c in forecast.attrs["channels"]]
    channels = []
    for name, array in forecast.data_vars.items():
        if "level" in array.dims:
            channels += [ScoredChannel(name, int(level)) for level in forecast["level"].values]
        else:
            channels.append(ScoredChannel(name, None))
    return channels


def open_truth(store: str | Path) -> tuple[xr.Dataset, StoreAttrs]:
    try:
        dataset = xr.open_zarr(store, consolidated=False, chunks=None)
    except Exception as error:
        raise StoreError(f"{store}: cannot be opened as a zarr store ({type(error).__name__}: {error})") from None
    attrs = StoreAttrs.from_json(dict(dataset.attrs), store=str(store))
    if not attrs.complete:
        raise StoreError(f"{store}: store is incomplete (root attribute 'complete' is not true)")
    return dataset, attrs


DAYS = 366  # day-of-year slots (1..366; day 366 only in leap years)


def _day_distance(a: np.ndarray, b: int) -> np.ndarray:
    """Days between day-of-year ``a`` and ``b`` around the year."""
    d = np.abs(a - b)
    return np.minimum(d, DAYS - d)


class Climatology:
    """Mean fields by (day of year, hour of day) over ``period``, smoothed over ``window`` days.

    As in WeatherBench2: the climatology at day ``d`` and hour ``h`` is the mean of every time of
    the period at hour ``h`` whose day of year lies within ``window // 2`` days of ``d`` (around
    the year). ``window`` None: every day (the climatology by hour of day alone, for periods of
    less than a year). Only the (day, hour) pairs of ``valid_times`` are built; the period is read
    ``block`` times at a time and summed in float64, one hour of day at a time, so memory stays
    at one field per day of year near a needed day.
    """

    def __init__(self, truth: xr.DataArray, period: tuple[str, str], store: str, valid_times: np.ndarray,
                 window: int | None = 61, block: int = 32):
        selected = truth.sel(time=slice(*period))
        if selected.sizes["time"] == 0:
            raise ScoringError(f"--climatology-period {period[0]}:{period[1]} holds no time of {store}; expected a "
                               f"period inside {str(truth.time.values[0])[:16]} .. "
                               f"{str(truth.time.values[-1])[:16]}")
        self.half = DAYS if window is None else window // 2
        self.fields: dict[tuple[int, int], np.ndarray] = {}
        days, hours = _day_and_hour(selected["time"].values)
        for hour in np.unique(_day_and_hour(valid_times)[1]):
            wanted = sorted({day for day, h in zip(*_day_and_hour(valid_times)) if h == hour})
            self._build(selected, days, hours, int(hour), wanted, block, period)

    def _build(self, selected: xr.DataArray, days: np.ndarray, hours: np.ndarray, hour: int, wanted: list[int],
               block: int, period: tuple[str, str]) -> None:
        near = (hours == hour) & np.any([_day_distance(days, d) <= self.half for d in wanted], axis=0)
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        positions = np.flatnonzero(near)
        for start in range(0, len(positions), block):
            chunk = positions[start:start + block]
            values = selected.isel(time=chunk).values
            for day in np.unique(days[chunk]):
                mine = days[chunk] == day
                sums[int(day)] = sums.get(int(day), 0) + values[mine].sum(axis=0, dtype=np.float64)
                counts[int(day)] = counts.get(int(day), 0) + int(mine.sum())
        for day in wanted:
            inside = [d for d in sums if _day_distance(np.asarray(d), day) <= self.half]
            if not inside:
                raise ScoringError(
                    f"climatology period {period[0]}:{period[1]} has no time at {hour:02d} UTC within "
                    f"{self.half} days of day of year {day}, which the forecast's valid times need; expected a "
                    f"period that covers the forecast's season at every hour of day (several years), or "
                    f"--climatology hour (by hour of day over the whole period)")
            self.fields[(day, hour)] = sum(sums[d] for d in inside) / sum(counts[d] for d in inside)

    def at(self, valid_times: np.ndarray) -> np.ndarray:
        """The climatology at each of ``valid_times``, ``(time, latitude, longitude)``."""
        return np.stack([self.fields[(int(d), int(h))] for d, h in zip(*_day_and_hour(valid_times))])


def _day_and_hour(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = pd.DatetimeIndex(times)
    return np.asarray(index.day_of_year), np.asarray(index.hour)


class ScoringError(ValueError):
    """A forecast that cannot be scored against a store; the message says what was expected."""


def _number(value: torch.Tensor | float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def score_channel(forecast: xr.DataArray, truth: xr.DataArray, clim: Climatology, latitudes: np.ndarray
                  ) -> dict[str, Any]:
    """Scores per lead of one channel: ``{method: {score: [per lead]}, "count": [...]}``.

    An ensemble forecast (a ``realization`` dim) is scored by its ensemble mean for RMSE, MAE,
    bias and ACC, and adds the model's fair ``crps``, ``spread``, ``spread_skill`` and
    ``rank_histogram`` (the area-weighted frequency of the truth's rank among the members).
    """
    init = forecast["time"].values
    store_times = truth["time"].values
    ensemble = "realization" in forecast.dims
    order = ("time", "realization", "latitude", "longitude") if ensemble else ("time", "latitude", "longitude")
    persistence = truth.sel(time=init).values.astype(np.float64)
    out: dict[str, Any] = {method: {score: [] for score in SCORES} for method in METHODS}
    if ensemble:
        out["model"].update({score: [] for score in ENSEMBLE_SCORES})
    out["count"] = []
    for k, lead in enumerate(forecast["prediction_timedelta"].values):
        valid = init + lead
        have = np.isin(valid, store_times)
        out["count"].append(int(have.sum()))
        if not have.any():  # the store ends before this lead: nothing to score against
            for scores in (out[method] for method in METHODS):
                for values in scores.values():
                    values.append(None)
            continue
        observed = torch.from_numpy(truth.sel(time=valid[have]).values.astype(np.float64))
        normal = torch.from_numpy(clim.at(valid[have]))
        model = torch.from_numpy(forecast.isel(prediction_timedelta=k).transpose(*order).values[have]
                                 .astype(np.float64))
        if ensemble:
            for score, value in _ensemble_scores(model, observed, latitudes).items():
                out["model"][score].append(value)
            model = model.mean(dim=1)
        predictions = {"model": model, "persistence": torch.from_numpy(persistence[have]), "climatology": normal}
        for method, predicted in predictions.items():
            for score, value in _scores(predicted, observed, normal, latitudes, method != "climatology").items():
                out[method][score].append(value)
    return out


def _scores(predicted: torch.Tensor, observed: torch.Tensor, normal: torch.Tensor, latitudes: np.ndarray,
            with_acc: bool) -> dict[str, float | None]:
    weights = dict(latitudes=True, time_dim=0)
    acc = metrics.acc(predicted, observed, normal, latitudes, **weights) if with_acc else float("nan")
    return {"rmse": _number(metrics.rmse(predicted, observed, latitudes, **weights)),
            "mae": _number(metrics.mae(predicted, observed, latitudes, **weights)),
            "bias": _number(metrics.bias(predicted, observed, latitudes, **weights)), "acc": _number(acc)}


def _ensemble_scores(members: torch.Tensor, observed: torch.Tensor, latitudes: np.ndarray) -> dict[str, Any]:
    """Fair CRPS, spread, spread/skill and rank histogram of ``members`` ``(time, member, lat, lon)``."""
    weights = dict(latitudes=True, member_dim=1, time_dim=0)
    spread_skill = metrics.spread_skill(members, observed, latitudes, **weights)
    histogram = metrics.rank_histogram(members, observed, latitudes, member_dim=1, latitudes=True)
    return {"crps": _number(metrics.crps_fair(members, observed, latitudes, **weights)),
            "spread": _number(spread_skill["spread"]), "spread_skill": _number(spread_skill["ratio"]),
            "rank_histogram": [float(v) for v in histogram]}


def parse_period(text: str) -> tuple[str, str]:
    """``START:END`` in the time format ``--init`` takes."""
    match = re.match(rf"^({DATETIME_PATTERN}):({DATETIME_PATTERN})$", text.strip())
    if not match:
        raise ScoringError(f"--climatology-period {text!r}: expected START:END (ISO dates, inclusive), e.g. "
                           f"1990-01-01:2019-12-31")
    return match.group(1), match.group(2)


def score_forecast(forecast_path: str | Path, store: str | Path, climatology_period: tuple[str, str] | None = None,
                   progress=None, window: int | None = 61) -> dict[str, Any]:
    """Everything ``scores.json`` holds (see :func:`score_channel` for the per-channel part).

    ``window``: the climatology's smoothing window in days (None: by hour of day only)."""
    forecast = open_forecast(forecast_path)
    truth, attrs = open_truth(store)
    period = climatology_period or attrs.statistics_period
    if period is None:
        period = (str(truth.time.values[0])[:19], str(truth.time.values[-1])[:19])
    latitudes = np.array(forecast["latitude"].values)  # a writable copy for torch
    missing_times = forecast["time"].values[~np.isin(forecast["time"].values, truth["time"].values)]
    if missing_times.size:
        raise ScoringError(f"forecast {forecast_path}: init times {[str(t)[:16] for t in missing_times[:4]]} are not "
                           f"on the time axis of {store}; persistence needs the state at every init time")
    try:
        truth = truth.sel(latitude=latitudes, longitude=forecast["longitude"].values)
    except KeyError:
        raise ScoringError(f"forecast {forecast_path}: its latitude/longitude grid is not part of the grid of "
                           f"{store}; expected a forecast on that store's grid") from None
    channels = forecast_channels(forecast)
    result: dict[str, Any] = {
        "forecast": str(forecast_path), "store": str(store), "climatology_period": list(period),
        "climatology": "hour of day" if window is None else f"day of year x hour of day, {window}-day window",
        "init_times": [str(t)[:19] for t in forecast["time"].values],
        "lead_hours": [int(lead / np.timedelta64(1, "h")) for lead in forecast["prediction_timedelta"].values],
        "scores": {}, "channels": {},
    }
    valid = (forecast["time"].values[:, None] + forecast["prediction_timedelta"].values[None]).ravel()
    valid = np.unique(valid[np.isin(valid, truth["time"].values)])
    for channel in progress(channels) if progress else channels:
        predicted, field = _channel_arrays(channel, forecast, truth, forecast_path, store)
        result["channels"][channel.name] = {"variable": channel.variable, "level": channel.level,
                                            "units": forecast[channel.variable].attrs.get("units", "")}
        clim = Climatology(field, period, str(store), valid, window)
        result["scores"][channel.name] = score_channel(predicted, field, clim, latitudes)
    return result


def _channel_arrays(channel: ScoredChannel, forecast: xr.Dataset, truth: xr.Dataset, forecast_path, store
                    ) -> tuple[xr.DataArray, xr.DataArray]:
    """The channel's forecast and truth, or an error naming what is missing where."""
    if channel.variable not in forecast:
        raise ScoringError(f"forecast {forecast_path}: variable {channel.variable!r} is listed in its 'channels' "
                           f"attribute but missing; it has {sorted(forecast.data_vars)}")
    if channel.store_variable not in truth:
        raise ScoringError(f"forecast variable {channel.variable!r} (store name {channel.store_variable!r}) is "
                           f"missing from {store}; expected a store with the forecast's variables")
    for name, dataset, array in (("forecast " + str(forecast_path), forecast, forecast[channel.variable]),
                                 (str(store), truth, truth[channel.store_variable])):
        if channel.level is not None and ("level" not in array.dims or channel.level not in dataset["level"].values):
            raise ScoringError(f"{name}: {array.name!r} has no level {channel.level} hPa; expected the levels of "
                               f"the forecast's channels")
    return channel.select(forecast[channel.variable]), channel.select(truth[channel.store_variable])


def score_table(result: dict[str, Any], channels: list[str], max_leads: int = 5) -> str:
    """A text table of the main scores for ``channels`` at up to ``max_leads`` leads (with the
    CRPS and spread/skill ratio of an ensemble)."""
    leads = result["lead_hours"]
    n = min(max_leads, len(leads))
    picks = sorted({round(i * (len(leads) - 1) / max(1, n - 1)) for i in range(n)})  # spread, last included
    ensemble = any("crps" in result["scores"][name]["model"] for name in channels)
    header = (f"{'channel':<8} {'lead h':>6} {'RMSE model':>11} {'persist.':>11} {'climat.':>11} {'bias model':>11} "
              f"{'ACC model':>9} {'persist.':>9}" + (f" {'CRPS':>11} {'spr/skill':>9}" if ensemble else ""))
    lines = [header, "-" * len(header)]

    def cell(value, width, digits):
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}g}"

    for name in channels:
        scores = result["scores"][name]
        for k in picks:
            line = (f"{name:<8} {leads[k]:>6} {cell(scores['model']['rmse'][k], 11, 4)} "
                    f"{cell(scores['persistence']['rmse'][k], 11, 4)} "
                    f"{cell(scores['climatology']['rmse'][k], 11, 4)} {cell(scores['model']['bias'][k], 11, 3)} "
                    f"{cell(scores['model']['acc'][k], 9, 3)} {cell(scores['persistence']['acc'][k], 9, 3)}")
            if ensemble:
                line += f" {cell(scores['model']['crps'][k], 11, 4)} {cell(scores['model']['spread_skill'][k], 9, 3)}"
            lines.append(line)
    return "\n".join(lines)
