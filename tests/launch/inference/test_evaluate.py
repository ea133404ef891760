"""Evaluation: scores equal a direct numpy computation; baselines; the CLI's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr

from launch.evaluate import main as evaluate_main
from launch.inference.forecaster import run_forecast
from launch.inference.scoring import Climatology, ScoringError, parse_period, score_forecast
from tests.data.store_fixtures import write_store
from tests.launch.inference.test_forecast import make_checkpoint

torch.set_num_threads(1)  # tiny models: on a shared 2-core machine a second thread only spins

# three inits 12 h apart, leads 0..18 h; the store ends at 2020-01-03T06, so the last init
# has truth at leads 0 and 6 h only
INIT = "2020-01-02T00:2020-01-03T00:12"
STEPS = 3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = write_store(root / "store.zarr", n_times=10, n_lat=8, n_lon=16, tile_grid=(2, 2), seed=3)
    checkpoint = make_checkpoint(store, root / "model.pt", seed=1)
    forecast = run_forecast(checkpoint, store, root / "forecast.zarr", INIT, STEPS, progress=False)
    return {"root": root, "store": store, "forecast": forecast}


def _weighted_mean(x: np.ndarray, latitudes: np.ndarray) -> np.ndarray:
    spacing = np.abs(np.diff(latitudes)).min()
    w = np.maximum(np.cos(np.deg2rad(latitudes)), np.sin(np.deg2rad(spacing / 4)))
    return (x * w[:, None]).sum(axis=(-2, -1)) / (w.sum() * x.shape[-1])


def _expected(case, variable, level, lead_index, period=None):
    """RMSE, bias and ACC of model, persistence and climatology, straight from the arrays."""
    forecast = xr.open_zarr(case["forecast"], consolidated=False)
    truth = xr.open_zarr(case["store"], consolidated=False)
    short = {"geopotential": "z", "2m_temperature": "t2m"}[variable]
    f_all = forecast[variable] if level is None else forecast[variable].sel(level=level)
    o_all = truth[short] if level is None else truth[short].sel(level=level)
    latitudes = forecast["latitude"].values
    times = o_all["time"].values
    clim_source = o_all if period is None else o_all.sel(time=slice(*period))
    hours = clim_source["time"].values.astype("datetime64[h]").astype(int) % 24
    clim_by_hour = {h: clim_source.values[hours == h].astype(np.float64).mean(axis=0) for h in np.unique(hours)}

    init = forecast["time"].values
    valid = init + forecast["prediction_timedelta"].values[lead_index]
    have = np.isin(valid, times)
    o = o_all.sel(time=valid[have]).values.astype(np.float64)
    c = np.stack([clim_by_hour[int(h)] for h in valid[have].astype("datetime64[h]").astype(int) % 24])
    predictions = {"model": f_all.isel(prediction_timedelta=lead_index).values[have].astype(np.float64),
                   "persistence": o_all.sel(time=init[have]).values.astype(np.float64), "climatology": c}
    out = {}
    for method, p in predictions.items():
        a, b = p - c, o - c
        with np.errstate(invalid="ignore"):  # the climatology's ACC is 0 / 0
            acc = (_weighted_mean(a * b, latitudes)
                   / np.sqrt(_weighted_mean(a * a, latitudes) * _weighted_mean(b * b, latitudes))).mean()
        out[method] = {"rmse": np.sqrt(_weighted_mean((p - o) ** 2, latitudes).mean()),
                       "bias": _weighted_mean(p - o, latitudes).mean(), "acc": acc}
    return out, int(have.sum())


@pytest.mark.parametrize("name, variable, level", [("z500", "geopotential", 500), ("t2m", "2m_temperature", None)])
def test_scores_equal_a_direct_numpy_computation(case, name, variable, level):
    result = score_forecast(case["forecast"], case["store"])
    scores = result["scores"][name]
    assert result["lead_hours"] == [0, 6, 12, 18]
    assert scores["count"] == [3, 3, 2, 2]
    for lead_index in range(4):
        expected, count = _expected(case, variable, level, lead_index)
        assert scores["count"][lead_index] == count
        for method in ("model", "persistence", "climatology"):
            for score in ("rmse", "bias"):
                assert scores[method][score][lead_index] == pytest.approx(expected[method][score], rel=1e-6,
                                                                          abs=1e-6), (method, score, lead_index)
        for method in ("model", "persistence"):
            assert scores[method]["acc"][lead_index] == pytest.approx(expected[method]["acc"], rel=1e-6, abs=1e-9)
        assert scores["climatology"]["acc"][lead_index] is None  # no anomaly, no correlation


def test_persistence_and_the_model_score_zero_at_lead_zero(case):
    scores = score_forecast(case["forecast"], case["store"])["scores"]
    for name, channel in scores.items():
        assert channel["persistence"]["rmse"][0] == 0.0, name
        assert channel["persistence"]["acc"][0] == pytest.approx(1.0), name
        # the model's lead 0 is its initial state, normalised and back: float32 rounding only
        assert channel["model"]["rmse"][0] < 1e-4 * channel["climatology"]["rmse"][0], name
        assert channel["model"]["rmse"][1] > 0.01 * channel["climatology"]["rmse"][1], name


def test_climatology_period_selects_the_climatology(case):
    period = parse_period("2020-01-01:2020-01-01T18")
    result = score_forecast(case["forecast"], case["store"], period)
    expected, _ = _expected(case, "geopotential", 500, 2, period)
    assert result["climatology_period"] == ["2020-01-01", "2020-01-01T18"]
    assert result["scores"]["z500"]["climatology"]["rmse"][2] == pytest.approx(expected["climatology"]["rmse"],
                                                                               rel=1e-6)
    assert result["scores"]["z500"]["model"]["acc"][2] == pytest.approx(expected["model"]["acc"], rel=1e-6)
    with pytest.raises(ScoringError, match="holds no time"):
        score_forecast(case["forecast"], case["store"], ("2019-01-01", "2019-12-31"))
    with pytest.raises(ScoringError, match="has no time at 06 UTC within 30 days of day of year 2"):
        score_forecast(case["forecast"], case["store"], ("2020-01-01T00", "2020-01-01T00"))


def test_cli_writes_scores_and_plots(case, tmp_path, capsys):
    output = tmp_path / "evaluation"
    assert evaluate_main(["--forecast", str(case["forecast"]), "--store", str(case["store"]), "--output",
                          str(output)]) == 0
    printed = capsys.readouterr().out
    assert "z500" in printed and "t850" in printed and f"evaluation written to {output / 'scores.json'}" in printed
    scores = json.loads((output / "scores.json").read_text())
    assert set(scores["scores"]) == {"msl", "t2m", "z500", "z850", "z1000", "t500", "t850", "t1000"}
    assert scores["channels"]["t850"] == {"variable": "temperature", "level": 850, "units": "K"}
    for figure in ("rmse.png", "map_z500.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (output / figure).stat().st_size > 20_000


def test_cli_refuses_an_incomplete_forecast(case, tmp_path, capsys):
    import shutil

    partial = tmp_path / "partial.zarr"
    shutil.copytree(case["forecast"], partial)
    zarr.open_group(str(partial), mode="r+").attrs["complete"] = False
    assert evaluate_main(["--forecast", str(partial), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out")]) == 1
    assert "is incomplete" in capsys.readouterr().err
    assert evaluate_main(["--forecast", str(case["forecast"]), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out"), "--climatology-period", "2020"]) == 1
    assert "expected START:END" in capsys.readouterr().err


def test_ensemble_forecast_gets_crps_and_spread_skill(case, tmp_path):
    """Three members around the forecast: RMSE/bias of the ensemble mean, fair CRPS of the members."""
    deterministic = xr.open_zarr(case["forecast"], consolidated=False).load()
    rng = np.random.default_rng(7)
    members = [deterministic + 0.0]
    for _ in range(2):
        member = deterministic.copy(deep=True)
        for name in member.data_vars:
            member[name] = member[name] + 20 * rng.standard_normal(member[name].shape).astype(np.float32)
        members.append(member)
    ensemble = xr.concat(members, dim="realization").transpose("realization", ...)
    ensemble.attrs = dict(deterministic.attrs)
    ensemble.to_zarr(tmp_path / "ensemble.zarr", zarr_format=3, consolidated=False)

    scores = score_forecast(tmp_path / "ensemble.zarr", case["store"])["scores"]["z500"]["model"]
    truth = xr.open_zarr(case["store"], consolidated=False)["z"].sel(level=500)
    forecast = ensemble["geopotential"].sel(level=500).isel(prediction_timedelta=1)
    forecast = forecast.transpose("time", "realization", ...)
    valid = ensemble["time"].values + ensemble["prediction_timedelta"].values[1]
    o = truth.sel(time=valid).values.astype(np.float64)
    x = forecast.values.astype(np.float64)  # (time, member, lat, lon)
    latitudes = ensemble["latitude"].values
    pairs = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=(1, 2))
    crps = np.abs(x - o[:, None]).mean(axis=1) - pairs / (2 * 3 * 2)
    assert scores["crps"][1] == pytest.approx(_weighted_mean(crps, latitudes).mean(), rel=1e-6)
    mean_rmse = np.sqrt(_weighted_mean((x.mean(axis=1) - o) ** 2, latitudes).mean())
    assert scores["rmse"][1] == pytest.approx(mean_rmse, rel=1e-6)
    spread = np.sqrt(_weighted_mean(x.var(axis=1, ddof=1), latitudes).mean())
    assert scores["spread"][1] == pytest.approx(spread, rel=1e-6)
    assert scores["spread_skill"][1] == pytest.approx(np.sqrt(4 / 3) * spread / mean_rmse, rel=1e-6)
    assert evaluate_main(["--forecast", str(tmp_path / "ensemble.zarr"), "--store", str(case["store"]),
                          "--output", str(tmp_path / "evaluation")]) == 0
    for name in ("scorecard.csv", "scorecard.md", "rank_histogram.png"):
        assert (tmp_path / "evaluation" / name).stat().st_size > 0
    histogram = score_forecast(tmp_path / "ensemble.zarr", case["store"])["scores"]["z500"]["model"]["rank_histogram"]
    assert len(histogram[1]) == 4 and sum(histogram[1]) == pytest.approx(1.0)
    card = (tmp_path / "evaluation" / "scorecard.md").read_text()
    assert "| z500 | 6 |" in card and "CRPS" in card


def _clim_field(days: int = 800) -> xr.DataArray:
    times = np.arange(np.datetime64("2018-01-01T00", "ns"), np.datetime64("2018-01-01T00", "ns")
                      + np.timedelta64(days, "D"), np.timedelta64(6, "h"))
    values = np.random.default_rng(8).standard_normal((len(times), 3, 4))
    return xr.DataArray(values, dims=("time", "latitude", "longitude"), coords={"time": times})


def test_climatology_by_day_of_year_and_hour_with_a_smoothing_window():
    field = _clim_field()
    valid = np.array(["2020-01-03T06", "2020-02-29T12", "2020-12-31T18"], dtype="datetime64[ns]")
    clim = Climatology(field, ("2018-01-01", "2020-02-15"), "s.zarr", valid, window=11)
    period = field.sel(time=slice("2018-01-01", "2020-02-15"))
    index = pd.DatetimeIndex(period["time"].values)
    for t, got in zip(valid, clim.at(valid)):
        day, hour = pd.Timestamp(t).day_of_year, pd.Timestamp(t).hour
        distance = np.abs(index.day_of_year - day)
        near = (np.minimum(distance, 366 - distance) <= 5) & (index.hour == hour)
        np.testing.assert_allclose(got, period.values[near].mean(axis=0), rtol=1e-12)
    by_hour = Climatology(field, ("2018-01-01", "2020-02-15"), "s.zarr", valid, window=None).at(valid[:1])
    np.testing.assert_allclose(by_hour[0], period.values[index.hour == 6].mean(axis=0), rtol=1e-12)


def test_a_climatology_period_too_short_for_the_season_is_refused(case, tmp_path, capsys):
    field = _clim_field(days=60)
    valid = np.array(["2018-07-01T00"], dtype="datetime64[ns]")
    with pytest.raises(ScoringError, match="no time at 00 UTC within 30 days of day of year 182.*--climatology hour"):
        Climatology(field, ("2018-01-01", "2018-02-28"), "s.zarr", valid)
    assert Climatology(field, ("2018-01-01", "2018-02-28"), "s.zarr", valid, window=None).at(valid).shape == (1, 3, 4)
    assert evaluate_main(["--forecast", str(case["forecast"]), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out"), "--climatology", "hour"]) == 0
    assert "hour of day" in json.loads((tmp_path / "out" / "scores.json").read_text())["climatology"]


def test_a_forecast_missing_a_listed_variable_is_named(case, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(case["forecast"], broken)
    shutil.rmtree(broken / "2m_temperature")
    assert evaluate_main(["--forecast", str(broken), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "variable '2m_temperature' is listed in its 'channels' attribute but missing" in error
    assert "Traceback" not in error
