"""Score a forecast store against a data store, with persistence and climatology baselines.

    python launch/evaluate.py --forecast FORECAST.zarr --store STORE.zarr --output DIR \\
        [--climatology-period 1990-01-01:2019-12-31] [--climatology dayofyear|hour]

Writes ``DIR/scores.json`` (RMSE, MAE, bias, ACC per channel, method and lead time; for an
ensemble forecast also the fair CRPS, spread, spread/skill ratio and rank histogram),
``DIR/scorecard.csv`` (every score) and ``DIR/scorecard.md`` (the headline channels),
``DIR/rmse.png`` (RMSE against lead time for the headline channels),
``DIR/rank_histogram.png`` (ensembles) and ``DIR/map_<channel>.png`` (truth, forecast and
error of z500, or the first channel, at the longest lead that has truth), and prints a
table of the main scores.

The climatology (baseline and ACC anomalies) is by day of year and hour of day, smoothed
over ``--climatology-window`` days (WeatherBench2's approach); a period too short to hold
every needed day and hour is refused, and ``--climatology hour`` falls back to the mean by
hour of day over the whole period.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.schema import HEADLINE_CHANNELS, StoreError  # noqa: E402
from launch.runtime.atomic import atomic_write_text  # noqa: E402
from data.forecast_store import ForecastError, open_forecast  # noqa: E402
from launch.inference.plots import plot_map, plot_rank_histograms, plot_rmse  # noqa: E402
from launch.inference.scorecard import write_scorecard  # noqa: E402
from launch.inference.scoring import ScoredChannel, ScoringError, parse_period, score_forecast, score_table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forecast", required=True, help="forecast zarr store (WeatherBench2 layout)")
    parser.add_argument("--store", required=True, help="data store with the truth")
    parser.add_argument("--output", required=True, help="folder for scores.json and the plots")
    parser.add_argument("--climatology-period", default=None,
                        help="START:END (inclusive) of the climatology; default the store's statistics period")
    parser.add_argument("--climatology", choices=("dayofyear", "hour"), default="dayofyear",
                        help="dayofyear: by day of year and hour of day, smoothed; hour: by hour of day only")
    parser.add_argument("--climatology-window", type=int, default=61, help="smoothing window in days")
    return parser.parse_args(argv)


def map_figure(result: dict, forecast_path: str, store: str, name: str, output: Path) -> Path | None:
    """The map panel of ``name`` at the longest lead with truth (first such init time)."""
    scores = result["scores"][name]
    scored = [k for k, count in enumerate(scores["count"]) if count > 0]
    if not scored:
        return None
    k = scored[-1]
    info = result["channels"][name]
    channel = ScoredChannel(info["variable"], info["level"])
    forecast = open_forecast(forecast_path)
    truth = xr.open_zarr(store, consolidated=False, chunks=None)
    lead = forecast["prediction_timedelta"].values[k]
    valid = forecast["time"].values + lead
    i = int(np.flatnonzero(np.isin(valid, truth["time"].values))[0])
    predicted = channel.select(forecast[channel.variable]).isel(time=i, prediction_timedelta=k)
    if "realization" in predicted.dims:  # an ensemble: show its mean
        predicted = predicted.mean("realization")
    predicted = predicted.values
    observed = channel.select(truth[channel.store_variable]).sel(
        time=valid[i], latitude=forecast["latitude"].values, longitude=forecast["longitude"].values).values
    title = (f"{name}: init {str(forecast['time'].values[i])[:16]}, lead {result['lead_hours'][k]} h "
             f"(valid {str(valid[i])[:16]})")
    return plot_map(observed, predicted, forecast["latitude"].values, forecast["longitude"].values, title,
                    info["units"], output / f"map_{name}.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    try:
        period = parse_period(args.climatology_period) if args.climatology_period else None
        if args.climatology_window < 1:
            raise ScoringError(f"--climatology-window {args.climatology_window}: expected a positive number of days")
        window = args.climatology_window if args.climatology == "dayofyear" else None
        result = score_forecast(args.forecast, args.store, period, window=window,
                                progress=lambda items: tqdm(items, desc="scoring", unit="channel"))
    except (ScoringError, ForecastError, StoreError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 1
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "scores.json", json.dumps(result, indent=1))
    headline = [name for name in HEADLINE_CHANNELS if name in result["scores"]] or list(result["scores"])[:4]
    written = [output / "scores.json", *write_scorecard(result, headline, output),
               plot_rmse(result, headline, output / "rmse.png")]
    if "rank_histogram" in result["scores"][headline[0]]["model"]:
        written.append(plot_rank_histograms(result, headline, output / "rank_histogram.png"))
    map_channel = "z500" if "z500" in result["scores"] else next(iter(result["scores"]))
    figure = map_figure(result, args.forecast, args.store, map_channel, output)
    if figure is not None:
        written.append(figure)
    print(score_table(result, headline))
    print(f"climatology period {result['climatology_period'][0]} .. {result['climatology_period'][1]}; "
          f"{len(result['init_times'])} init times; all channels and leads in scores.json")
    print("evaluation written to " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
