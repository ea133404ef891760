"""Forecasts: any mesh gives the single-process forecast; the store has the WB2 layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from data.schema import StoreAttrs, StoreError
from data.time_features import time_features
from launch.training.checkpoint_format import load_consolidated, save_consolidated
from launch.forecast import main as forecast_main
from data.forecast_store import ForecastError
from launch.inference.forecaster import parse_init_times, run_forecast
from parallel.mesh import MeshConfig
from parallel.tiling import chunk_length
from launch.runtime.rank_inputs import config_for_store
from parallel.mesh import MeshError
from tests.data.store_fixtures import write_store
from tests.distributed import spawn
from weathermixer.config import preset
from weathermixer.model import WeatherMixer

torch.set_num_threads(1)  # tiny models: on a shared 2-core machine a second thread only spins

REPO = Path(__file__).resolve().parents[3]
INIT = "2020-01-01T06:2020-01-01T18"  # three init times, 6-hourly
STEPS = 3


def make_checkpoint(store: Path, path: Path, seed: int = 0, shift_statistics: bool = False, **overrides) -> Path:
    """A consolidated checkpoint of a freshly initialised tiny model for ``store``.

    ``shift_statistics``: record normalisation statistics other than the store's, as for a
    model trained on another period.
    """
    attrs = StoreAttrs.from_json(dict(zarr.open_group(str(store), mode="r").attrs))
    config = config_for_store(preset("tiny", **overrides), str(store))
    model = WeatherMixer(config, seed=seed)
    mean, std = np.asarray(attrs.mean), np.asarray(attrs.std)
    if shift_statistics:
        mean, std = mean + 0.5 * std, 1.5 * std
    metadata = {"channels": [c.to_json() for c in attrs.channels], "static_channels": list(attrs.static_channels),
                "time_step_hours": attrs.time_step_hours,
                "normalization": {"mean": mean.tolist(), "std": std.tolist()}, "store": str(store), "step": 7}
    return save_consolidated(path, config, {k: v.detach() for k, v in model.named_parameters()}, metadata)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    store = write_store(root / "store.zarr", n_times=10, n_lat=8, n_lon=16, tile_grid=(2, 2))
    checkpoint = make_checkpoint(store, root / "model.pt")
    serial = run_forecast(checkpoint, store, root / "serial.zarr", INIT, STEPS, dtype=torch.float64, progress=False)
    return {"root": root, "store": store, "checkpoint": checkpoint, "serial": serial}


def _values(path: Path) -> dict[str, np.ndarray]:
    dataset = xr.open_zarr(path, consolidated=False)
    return {name: dataset[name].values for name in dataset.data_vars}


def _assert_same_forecast(path: Path, reference: Path) -> None:
    got, expected = _values(path), _values(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        assert not np.isnan(got[name]).any(), f"{path}: {name} has unwritten (NaN) regions"
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-4, err_msg=f"{path}: {name}")


# ------------------------------------------------------------------ layout and values
def test_store_has_the_weatherbench2_layout(case):
    dataset = xr.open_zarr(case["serial"], consolidated=False)
    assert dataset.attrs["complete"] is True
    assert set(dataset.data_vars) == {"mean_sea_level_pressure", "2m_temperature", "geopotential", "temperature"}
    assert dataset["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert dataset["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert dataset["temperature"].attrs["units"] == "K"
    assert dataset["geopotential"].attrs["long_name"] == "Geopotential"
    np.testing.assert_array_equal(dataset["time"].values, np.array(["2020-01-01T06", "2020-01-01T12", "2020-01-01T18"],
                                                                   dtype="datetime64[ns]"))
    np.testing.assert_array_equal(dataset["prediction_timedelta"].values, np.arange(STEPS + 1) * np.timedelta64(6, "h"))
    assert list(dataset["level"].values) == [500, 850, 1000]
    assert np.all(np.diff(dataset["latitude"].values) > 0)
    assert dataset.attrs["checkpoint_step"] == 7
    assert not any(p.name.endswith(".partial") for p in case["root"].iterdir())


@pytest.mark.parametrize("shift_statistics", [False, True])
def test_values_are_the_denormalised_model_states(case, tmp_path, shift_statistics):
    """Lead 0 is the store's state; lead 1 is one step of the serial model on the full grid,
    computed here without the tile reader, in the checkpoint's normalisation (which need not
    be the store's)."""
    checkpoint, path = case["checkpoint"], case["serial"]
    if shift_statistics:
        checkpoint = make_checkpoint(case["store"], tmp_path / "shifted.pt", shift_statistics=True)
        path = run_forecast(checkpoint, case["store"], tmp_path / "shifted.zarr", INIT, STEPS, dtype=torch.float64,
                            progress=False)
    truth = xr.open_zarr(case["store"], consolidated=False)
    forecast = xr.open_zarr(path, consolidated=False).isel(time=1)
    init = forecast["time"].values
    consolidated = load_consolidated(checkpoint)
    metadata = consolidated.metadata
    mean, std = (np.asarray(metadata["normalization"][k]) for k in ("mean", "std"))
    channels = [(c["variable"], c["level"]) for c in metadata["channels"]]

    def field(dataset, variable, level, wb2=False):
        array = dataset[variable]
        return (array if level is None else array.sel(level=level)).values

    state = np.stack([field(truth.sel(time=init), v, lev) for v, lev in channels], axis=-1)
    static = np.stack([truth[name].values for name in metadata["static_channels"]], axis=-1)
    attrs = StoreAttrs.from_json(truth.attrs)
    static = (static - np.asarray(attrs.static_mean)) / np.asarray(attrs.static_std)
    model = WeatherMixer(consolidated.model_config).double()
    model.load_state_dict(consolidated.state_dict, strict=False)
    forcings = time_features(init, truth["longitude"].values, len(truth["latitude"]))
    with torch.no_grad():
        step = model(torch.from_numpy((state - mean) / std)[None], torch.from_numpy(static),
                     torch.from_numpy(forcings).double()[None])[0].numpy() * std + mean

    names = {"msl": "mean_sea_level_pressure", "t2m": "2m_temperature", "z": "geopotential", "t": "temperature"}
    for k, (variable, level) in enumerate(channels):
        written = forecast[names[variable]]
        written = written if level is None else written.sel(level=level)
        np.testing.assert_allclose(written.isel(prediction_timedelta=0).values, state[..., k], rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(written.isel(prediction_timedelta=1).values, step[..., k], rtol=1e-5, atol=1e-3)
        assert np.abs(step[..., k] - state[..., k]).max() > 1e-2  # the model changes the state


@pytest.mark.filterwarnings("ignore:.*not made of whole chunks")  # the store's chunks are for 4-row tiles
@pytest.mark.parametrize("grid_policy, rows", [("crop", 6), ("pad", 8)])
def test_output_grid_is_the_model_grid_rows_in_the_store(case, tmp_path, grid_policy, rows):
    """Patches of 3 rows on 8 stored rows: crop to 6 rows, or pad to 9 and write the 8 that exist."""
    checkpoint = make_checkpoint(case["store"], tmp_path / "model.pt", patch=(3, 4), grid_policy=grid_policy)
    output = run_forecast(checkpoint, case["store"], tmp_path / "out.zarr", "2020-01-01T00", 2, progress=False)
    forecast = xr.open_zarr(output, consolidated=False)
    truth = xr.open_zarr(case["store"], consolidated=False)
    np.testing.assert_array_equal(forecast["latitude"].values, truth["latitude"].values[:rows])
    assert not np.isnan(forecast["temperature"].values).any()
    np.testing.assert_allclose(forecast["temperature"].isel(time=0, prediction_timedelta=0).values,
                               truth["t"].isel(time=0, latitude=slice(0, rows)).values, rtol=1e-5, atol=1e-3)


def test_bfloat16_forecast_is_close_to_float32(case, tmp_path):
    arguments = ["--checkpoint", str(case["checkpoint"]), "--store", str(case["store"]), "--init", "2020-01-01T00",
                 "--steps", "2"]
    assert forecast_main(arguments + ["--output", str(tmp_path / "bf16.zarr"), "--dtype", "bfloat16"]) == 0
    assert forecast_main(arguments + ["--output", str(tmp_path / "f32.zarr")]) == 0
    low, high = xr.open_zarr(tmp_path / "bf16.zarr", consolidated=False), xr.open_zarr(tmp_path / "f32.zarr",
                                                                                       consolidated=False)
    for name in high.data_vars:
        spread = float(high[name].std())
        error = float(np.abs(low[name] - high[name]).max())
        assert 0 < error < 0.1 * spread, name  # bfloat16 rounds (error > 0) but stays close


def test_compiled_forecast_equals_eager(case, tmp_path):
    """``--compile`` compiles the step the rollout calls (module-level compile would not reach it)."""
    from torch._dynamo.utils import counters

    counters.clear()
    path = run_forecast(case["checkpoint"], case["store"], tmp_path / "compiled.zarr", INIT, STEPS,
                        dtype=torch.float64, progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the step did go through torch.compile
    _assert_same_forecast(path, case["serial"])


# ------------------------------------------------------------------ meshes
# (domain, tensor) on 4 ranks; a model group of 2 leaves 2 replicas that share the init times out
MESHES = [((2, 1), 2), ((1, 2), 1), ((1, 1), 2)]


def _forecast_on_meshes(rank, world_size, checkpoint, store, root):
    paths = []
    for domain, tensor in MESHES:
        path = Path(root) / f"domain{domain[0]}x{domain[1]}_tensor{tensor}.zarr"
        paths.append(str(run_forecast(checkpoint, store, path, INIT, STEPS, mesh=MeshConfig(domain=domain, tensor=tensor),
                                      dtype=torch.float64, progress=False)))
    return paths


def test_any_mesh_gives_the_single_process_forecast(case):
    """Spawning processes is the slow part, so one 4-rank world runs every mesh (the 2-rank
    world without replicas is the torchrun test below)."""
    paths = spawn(_forecast_on_meshes, 4, str(case["checkpoint"]), str(case["store"]), str(case["root"]))[0]
    for path in paths:
        _assert_same_forecast(Path(path), case["serial"])


def test_torchrun_cli_gives_the_single_process_forecast(case, tmp_path):
    output = tmp_path / "torchrun.zarr"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch" / "forecast.py"), "--checkpoint", str(case["checkpoint"]), "--store",
               str(case["store"]), "--output", str(output), "--init", INIT, "--steps", str(STEPS),
               "--domain", "2x1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"forecast written to {output}" in result.stdout
    # the CLI computes in float32; compare with a float32 single-process run
    reference = run_forecast(case["checkpoint"], case["store"], tmp_path / "serial32.zarr", INIT, STEPS,
                             progress=False)
    _assert_same_forecast(output, reference)


# ------------------------------------------------------------------ errors
def test_init_times_parse_and_must_lie_in_the_store():
    times = np.arange(np.datetime64("2020-01-01T00", "ns"), np.datetime64("2020-01-03T00", "ns"),
                      np.timedelta64(6, "h"))
    parsed = parse_init_times("2020-01-01T00:00:2020-01-02T00:00:12", times, 6, "s.zarr")
    np.testing.assert_array_equal(parsed, np.array(["2020-01-01T00", "2020-01-01T12", "2020-01-02T00"],
                                                   dtype="datetime64[ns]"))
    assert len(parse_init_times("2020-01-01T06", times, 6, "s.zarr")) == 1
    assert len(parse_init_times("2020-01-01:2020-01-01T18", times, 6, "s.zarr")) == 4
    with pytest.raises(ForecastError, match="not on the time axis of s.zarr"):
        parse_init_times("2020-01-02T00:2020-01-04T00", times, 6, "s.zarr")
    with pytest.raises(ForecastError, match="START"):
        parse_init_times("yesterday", times, 6, "s.zarr")


def test_chunks_divide_every_tile():
    assert chunk_length([(0, 8), (8, 12)], 12) == 4
    assert chunk_length([(0, 360), (360, 720)], 721) == 360  # crop: 721 stored rows, 720 model rows
    assert chunk_length([(0, 9)], 9) == 9


def test_refuses_another_stores_channels_and_grid(case, tmp_path):
    other = write_store(tmp_path / "other.zarr", n_times=4, n_lat=8, n_lon=16, upper_air=("z", "u"))
    with pytest.raises(StoreError, match="differ from the checkpoint's"):
        run_forecast(case["checkpoint"], other, tmp_path / "out.zarr", "2020-01-01T00", 2, progress=False)
    wider = write_store(tmp_path / "wider.zarr", n_times=4, n_lat=8, n_lon=24)
    with pytest.raises(ForecastError, match="trained on a 8x16 grid"):
        run_forecast(case["checkpoint"], wider, tmp_path / "out.zarr", "2020-01-01T00", 2, progress=False)


def test_refuses_bad_init_incomplete_store_and_misfit_mesh(case, tmp_path):
    with pytest.raises(ForecastError, match="not on the time axis"):
        run_forecast(case["checkpoint"], case["store"], tmp_path / "out.zarr", "2021-06-01T00", 2, progress=False)
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(case["store"], incomplete)
    group = zarr.open_group(str(incomplete), mode="r+")
    group.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        run_forecast(case["checkpoint"], incomplete, tmp_path / "out.zarr", "2020-01-01T00", 2, progress=False)
    with pytest.raises(MeshError, match="(?i)mesh"):
        run_forecast(case["checkpoint"], case["store"], tmp_path / "out.zarr", "2020-01-01T00", 2, mesh=MeshConfig(domain=(2, 1)),
                     progress=False)
    with pytest.raises(ForecastError, match="--overwrite"):
        run_forecast(case["checkpoint"], case["store"], case["serial"], "2020-01-01T00", 2, progress=False)
    assert not (tmp_path / "out.zarr").exists()


def test_cli_reports_errors_without_a_traceback(case, tmp_path, capsys):
    code = forecast_main(["--checkpoint", str(case["checkpoint"]), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out.zarr"), "--init", "2030-01-01T00", "--steps", "2"])
    assert code == 1
    assert "forecast: error: --init '2030-01-01T00'" in capsys.readouterr().err


def _fail_on_rank_one(rank, world_size, checkpoint, store, output):
    import launch.inference.forecaster

    if rank == 1:
        def broken(*args, **kwargs):
            raise OSError("disk full")
        launch.inference.forecaster.write_region = broken
    try:
        run_forecast(checkpoint, store, output, INIT, STEPS, mesh=MeshConfig(domain=(2, 1)), progress=False)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_write_failing_on_one_rank_fails_every_rank(case, tmp_path):
    output = tmp_path / "failed.zarr"
    errors = spawn(_fail_on_rank_one, 2, str(case["checkpoint"]), str(case["store"]), str(output), timeout=120)
    assert errors[1] == "OSError: disk full"
    assert errors[0].startswith("ForecastError: writing the forecast into") and "disk full" in errors[0]
    assert not output.exists()  # never marked complete
