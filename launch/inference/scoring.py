"""Scores of a forecast store against a data store's truth, and of two baselines.

For every channel (variable and level) and lead time, over the init times whose valid time
``init + lead`` is on the store's time axis:

* **model**: the forecast;
* **persistence**: the state at the init time, kept for every lead (scores zero at lead 0);
* **climatology**: the per-grid-point mean over the climatology period, by hour of day
  (a store with one hour of day has one mean field), at the valid time's hour.

Scores are latitude-weighted RMSE, bias and ACC (anomalies against the same climatology)
from :mod:`weathermixer.metrics`; the climatology baseline has no ACC (its anomaly is
zero). An ensemble forecast (a ``realization`` dim) also gets the fair CRPS and the
spread/skill ratio. Fields are read one lead at a time, so memory stays at a few fields
per channel.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from data.schema import StoreAttrs, StoreError
from data.forecast_store import SHORT_NAMES, open_forecast, wb2_name
from launch.inference.forecaster import DATETIME_PATTERN
from weathermixer import metrics

METHODS = ("model", "persistence", "climatology")
SCORES = ("rmse", "bias", "acc")


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


def climatology(truth: xr.DataArray, period: tuple[str, str], store: str, block: int = 32) -> xr.DataArray:
    """Mean ``(hour, latitude, longitude)`` over ``period`` (inclusive; a date means its whole day).

    Read ``block`` times at a time and summed in float64, so a period of decades needs the
    memory of a few fields, not of the period.
    """
    selected = truth.sel(time=slice(*period))
    if selected.sizes["time"] == 0:
        raise ScoringError(f"--climatology-period {period[0]}:{period[1]} holds no time of {store}; expected a "
                           f"period inside {str(truth.time.values[0])[:16]} .. {str(truth.time.values[-1])[:16]}")
    hours = selected["time"].values.astype("datetime64[h]").astype(np.int64) % 24
    sums = {int(hour): np.zeros(selected.shape[1:], dtype=np.float64) for hour in np.unique(hours)}
    for start in range(0, len(hours), block):
        values = selected.isel(time=slice(start, start + block)).values
        for hour in np.unique(hours[start:start + block]):
            sums[int(hour)] += values[hours[start:start + block] == hour].sum(axis=0, dtype=np.float64)
    ordered = sorted(sums)
    means = np.stack([sums[hour] / np.count_nonzero(hours == hour) for hour in ordered])
    return xr.DataArray(means, dims=("hour", *selected.dims[1:]),
                        coords={"hour": ordered, **{d: selected[d] for d in selected.dims[1:]}})


class ScoringError(ValueError):
    """A forecast that cannot be scored against a store; the message says what was expected."""


def _number(value: torch.Tensor | float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def score_channel(forecast: xr.DataArray, truth: xr.DataArray, clim: xr.DataArray, latitudes: np.ndarray,
                  period: tuple[str, str]) -> dict[str, Any]:
    """Scores per lead of one channel: ``{method: {score: [per lead]}, "count": [...]}``.

    An ensemble forecast (a ``realization`` dim) is scored by its ensemble mean for RMSE,
    bias and ACC, and adds the model's ``crps`` (fair) and ``spread`` / ``spread_skill``.
    """
    init = forecast["time"].values
    store_times = truth["time"].values
    ensemble = "realization" in forecast.dims
    order = ("time", "realization", "latitude", "longitude") if ensemble else ("time", "latitude", "longitude")
    persistence = truth.sel(time=init).values.astype(np.float64)
    out: dict[str, Any] = {method: {score: [] for score in SCORES} for method in METHODS}
    if ensemble:
        out["model"].update(crps=[], spread=[], spread_skill=[])
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
        hours = valid[have].astype("datetime64[h]").astype(np.int64) % 24
        missing_hours = sorted(set(hours.tolist()) - set(clim["hour"].values.tolist()))
        if missing_hours:
            raise ScoringError(f"climatology period {period[0]}:{period[1]} has no times at hours {missing_hours} "
                               f"UTC, which the forecast's valid times need; expected a period with every hour "
                               f"of day of the store")
        observed = torch.from_numpy(truth.sel(time=valid[have]).values.astype(np.float64))
        normal = torch.from_numpy(clim.sel(hour=hours).values.astype(np.float64))
        model = torch.from_numpy(forecast.isel(prediction_timedelta=k).transpose(*order).values[have]
                                 .astype(np.float64))
        if ensemble:
            weights = dict(latitudes=True, member_dim=1, time_dim=0)
            out["model"]["crps"].append(_number(metrics.crps_fair(model, observed, latitudes, **weights)))
            spread_skill = metrics.spread_skill(model, observed, latitudes, **weights)
            out["model"]["spread"].append(_number(spread_skill["spread"]))
            out["model"]["spread_skill"].append(_number(spread_skill["ratio"]))
            model = model.mean(dim=1)
        predictions = {"model": model, "persistence": torch.from_numpy(persistence[have]), "climatology": normal}
        for method, predicted in predictions.items():
            out[method]["rmse"].append(_number(metrics.rmse(predicted, observed, latitudes, latitudes=True,
                                                            time_dim=0)))
            out[method]["bias"].append(_number(metrics.bias(predicted, observed, latitudes, latitudes=True,
                                                            time_dim=0)))
            acc = (float("nan") if method == "climatology" else
                   metrics.acc(predicted, observed, normal, latitudes, latitudes=True, time_dim=0))
            out[method]["acc"].append(_number(acc))
    return out


def parse_period(text: str) -> tuple[str, str]:
    """``START:END`` in the time format ``--init`` takes."""
    match = re.match(rf"^({DATETIME_PATTERN}):({DATETIME_PATTERN})$", text.strip())
    if not match:
        raise ScoringError(f"--climatology-period {text!r}: expected START:END (ISO dates, inclusive), e.g. "
                           f"1990-01-01:2019-12-31")
    return match.group(1), match.group(2)


def score_forecast(forecast_path: str | Path, store: str | Path, climatology_period: tuple[str, str] | None = None,
                   progress=None) -> dict[str, Any]:
    """Everything ``scores.json`` holds (see :func:`score_channel` for the per-channel part)."""
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
        "init_times": [str(t)[:19] for t in forecast["time"].values],
        "lead_hours": [int(lead / np.timedelta64(1, "h")) for lead in forecast["prediction_timedelta"].values],
        "scores": {}, "channels": {},
    }
    for channel in progress(channels) if progress else channels:
        if channel.store_variable not in truth:
            raise ScoringError(f"forecast variable {channel.variable!r} (store name {channel.store_variable!r}) is "
                               f"missing from {store}; expected a store with the forecast's variables")
        field = channel.select(truth[channel.store_variable])
        result["channels"][channel.name] = {"variable": channel.variable, "level": channel.level,
                                            "units": forecast[channel.variable].attrs.get("units", "")}
        result["scores"][channel.name] = score_channel(channel.select(forecast[channel.variable]), field,
                                                       climatology(field, period, str(store)), latitudes, period)
    return result


def score_table(result: dict[str, Any], channels: list[str], max_leads: int = 5) -> str:
    """A text table of the main scores for ``channels`` at up to ``max_leads`` leads."""
    leads = result["lead_hours"]
    n = min(max_leads, len(leads))
    picks = sorted({round(i * (len(leads) - 1) / max(1, n - 1)) for i in range(n)})  # spread, last included
    header = (f"{'channel':<8} {'lead h':>6} {'RMSE model':>11} {'persist.':>11} {'climat.':>11} {'bias model':>11} "
              f"{'ACC model':>9} {'persist.':>9}")
    lines = [header, "-" * len(header)]

    def cell(value, width, digits):
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}g}"

    for name in channels:
        scores = result["scores"][name]
        for k in picks:
            lines.append(f"{name:<8} {leads[k]:>6} {cell(scores['model']['rmse'][k], 11, 4)} "
                         f"{cell(scores['persistence']['rmse'][k], 11, 4)} "
                         f"{cell(scores['climatology']['rmse'][k], 11, 4)} {cell(scores['model']['bias'][k], 11, 3)} "
                         f"{cell(scores['model']['acc'][k], 9, 3)} {cell(scores['persistence']['acc'][k], 9, 3)}")
    return "\n".join(lines)

