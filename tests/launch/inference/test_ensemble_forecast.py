"""Ensemble forecasts: members on the sample axis, the same members on any mesh, resumable writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from data.forecast_store import ForecastError, Progress, partial_path
from launch.forecast import main as forecast_main
from launch.inference.forecaster import Members, run_forecast
from parallel.mesh import MeshConfig
from tests.data.store_fixtures import write_store
from tests.distributed import spawn
from tests.launch.inference.test_forecast import INIT, STEPS, _assert_same_forecast, _values, make_checkpoint

torch.set_num_threads(1)
MEMBERS = 4
NOISE = 0.2


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    store = write_store(root / "store.zarr", n_times=10, n_lat=8, n_lon=16, tile_grid=(2, 2))
    bayesian = make_checkpoint(store, root / "bayesian.pt", bayesian=("all",), init_sigma=0.05)
    serial = run_forecast(bayesian, store, root / "serial.zarr", INIT, STEPS, dtype=torch.float64, progress=False,
                          members=Members(MEMBERS, seed=3, input_noise=NOISE))
    plain = make_checkpoint(store, root / "plain.pt")  # members from the input noise alone, shared weights
    one_at_a_time = run_forecast(plain, store, root / "plain_one_at_a_time.zarr", INIT, STEPS, dtype=torch.float64,
                                 progress=False, members=Members(MEMBERS, seed=3, input_noise=NOISE))
    return {"root": root, "store": store, "bayesian": bayesian, "serial": serial, "plain": plain,
            "one_at_a_time": one_at_a_time}


def test_store_has_a_realization_dim_and_distinct_members(case):
    dataset = xr.open_zarr(case["serial"], consolidated=False)
    assert dataset["geopotential"].dims == ("time", "prediction_timedelta", "realization", "level", "latitude",
                                            "longitude")
    assert dataset["2m_temperature"].dims == ("time", "prediction_timedelta", "realization", "latitude", "longitude")
    assert dataset.sizes["realization"] == MEMBERS and dataset.attrs["ensemble_dim"] == "realization"
    values = dataset["2m_temperature"].values
    assert not np.isnan(values).any()
    for k in range(1, MEMBERS):  # every member its own draw, from the initial state on
        assert not np.allclose(values[:, :, 0], values[:, :, k])
    assert not (partial_path(case["serial"])).exists() and not Progress(case["serial"]).folder.exists()


def test_members_are_reproducible_and_depend_on_the_seed(case, tmp_path):
    again = run_forecast(case["bayesian"], case["store"], tmp_path / "again.zarr", INIT, STEPS, dtype=torch.float64,
                         progress=False, members=Members(MEMBERS, seed=3, input_noise=NOISE))
    _assert_same_forecast(again, case["serial"])
    other = run_forecast(case["bayesian"], case["store"], tmp_path / "other.zarr", INIT, STEPS, dtype=torch.float64,
                         progress=False, members=Members(2, seed=4, input_noise=NOISE))
    assert not np.allclose(_values(other)["2m_temperature"], _values(case["serial"])["2m_temperature"][:, :, :2])


def test_a_deterministic_model_makes_members_from_input_noise_alone(case, tmp_path):
    checkpoint = make_checkpoint(case["store"], tmp_path / "plain.pt")
    with pytest.raises(ForecastError, match="every member would be the same forecast"):
        run_forecast(checkpoint, case["store"], tmp_path / "same.zarr", INIT, STEPS, progress=False,
                     members=Members(2))
    path = run_forecast(checkpoint, case["store"], tmp_path / "noise.zarr", INIT, STEPS, progress=False,
                        members=Members(2, input_noise=NOISE))
    values = _values(path)["2m_temperature"]
    deterministic = _values(run_forecast(checkpoint, case["store"], tmp_path / "one.zarr", INIT, STEPS,
                                         progress=False))["2m_temperature"]
    assert not np.allclose(values[:, :, 0], values[:, :, 1])
    spread = np.abs(values[:, 0] - deterministic[:, 0][:, None]).max()  # the perturbation of the initial state
    assert 0 < spread < 10 * NOISE * np.abs(deterministic).max()


def _ensemble_on_meshes(rank, world_size, checkpoint, store, root, meshes, batch_size=1):
    paths = []
    for sample, domain in meshes:
        path = f"{root}/{Path(checkpoint).stem}_sample{sample}_domain{domain[0]}x{domain[1]}_of{world_size}.zarr"
        paths.append(str(run_forecast(checkpoint, store, path, INIT, STEPS, dtype=torch.float64, progress=False,
                                      mesh=MeshConfig(sample=sample, domain=domain), batch_size=batch_size,
                                      members=Members(MEMBERS, seed=3, input_noise=NOISE))))
    return paths


@pytest.mark.parametrize("world, meshes", [
    (2, [(2, (1, 1)), (1, (1, 2))]),  # members over 2 sample ranks; one replica on a 1x2 domain
    (4, [(2, (2, 1)), (4, (1, 1)), (1, (1, 1))]),  # sample x domain; 4 sample ranks; 4 data replicas
])
def test_any_mesh_gives_the_single_process_members(case, world, meshes):
    paths = spawn(_ensemble_on_meshes, world, str(case["bayesian"]), str(case["store"]), str(case["root"]),
                  meshes, timeout=240)[0]
    for path in paths:
        _assert_same_forecast(Path(path), case["serial"])


def test_a_rerun_keeps_the_pairs_already_written(case, tmp_path, monkeypatch):
    import launch.inference.forecaster as forecaster

    output, written, interrupt = tmp_path / "resumed.zarr", [], [True]
    original = forecaster.write_region

    def write_then_fail(*args, **kwargs):
        if interrupt[0] and len(written) == 5:
            raise OSError("interrupted")
        written.append((tuple(args[3]), kwargs.get("member", args[-1])))
        original(*args, **kwargs)

    monkeypatch.setattr(forecaster, "write_region", write_then_fail)
    request = dict(dtype=torch.float64, progress=False, members=Members(MEMBERS, seed=3, input_noise=NOISE))
    with pytest.raises(OSError, match="interrupted"):
        run_forecast(case["bayesian"], case["store"], output, INIT, STEPS, **request)
    assert len(Progress(output).done()) == 5 and not output.exists()
    first = list(written)
    written.clear()
    interrupt[0] = False
    run_forecast(case["bayesian"], case["store"], output, INIT, STEPS, **request)
    assert len(written) == 3 * MEMBERS - 5 and not set(written) & set(first)  # only the missing pairs
    _assert_same_forecast(output, case["serial"])


# ------------------------------------------------------------------ members batched together
def _assert_same_to_rounding(path: Path, reference: Path) -> None:
    """The same forecast up to one float32 unit in the last place.

    A batch changes the shape of the token-mixing product ``(tokens, batch x channels)``, and
    CPU GEMM kernels may block its sums over tokens differently for another width: the
    float64 states then differ by rounding (~1e-14 relative), which at most flips the
    rounding of the stored float32 value.
    """
    got, expected = _values(path), _values(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        assert not np.isnan(got[name]).any(), f"{path}: {name} has unwritten (NaN) regions"
        np.testing.assert_array_max_ulp(got[name], expected[name], maxulp=1)


@pytest.fixture
def batches(monkeypatch):
    """The members of every batch rolled out, in order."""
    import launch.inference.forecaster as forecaster

    seen, original = [], forecaster.MemberRollout.__call__

    def record(self, state, static, forcings, time_indices, members, steps):
        seen.append(list(members))
        return original(self, state, static, forcings, time_indices, members, steps)

    monkeypatch.setattr(forecaster.MemberRollout, "__call__", record)
    return seen


def test_members_that_share_the_weights_roll_out_together(case, tmp_path, batches):
    path = run_forecast(case["plain"], case["store"], tmp_path / "together.zarr", INIT, STEPS, dtype=torch.float64,
                        progress=False, batch_size=5, members=Members(MEMBERS, seed=3, input_noise=NOISE))
    # 3 init times x 4 members, member by member: a batch holds several members and init times
    assert batches == [[0, 0, 0, 1, 1], [1, 2, 2, 2, 3], [3, 3]]
    _assert_same_to_rounding(path, case["one_at_a_time"])


def test_a_bayesian_model_rolls_out_one_member_at_a_time(case, tmp_path, batches):
    path = run_forecast(case["bayesian"], case["store"], tmp_path / "bayesian.zarr", INIT, STEPS,
                        dtype=torch.float64, progress=False, batch_size=5,
                        members=Members(MEMBERS, seed=3, input_noise=NOISE))
    assert batches == [[member] * 3 for member in range(MEMBERS)]  # its init times together
    _assert_same_to_rounding(path, case["serial"])


def test_a_batch_refuses_members_with_their_own_weights(case):
    from launch.inference.forecaster import MemberRollout

    class Bayesian:
        config = type("Config", (), {"is_bayesian": True})

    roll_out = MemberRollout(Bayesian(), 3, perturb=None)
    with pytest.raises(ForecastError, match="expected one member per batch"):
        roll_out(None, None, None, (0, 0), (0, 1), STEPS)
    with pytest.raises(ForecastError, match="deterministic forecast .None. expected alone"):
        roll_out(None, None, None, (0, 0), (None, 1), STEPS)


def test_batched_members_on_any_mesh_are_the_single_process_members(case):
    meshes = [(2, (1, 1)), (1, (1, 2))]  # 2 members a sample rank, batched; all 4 batched on a 1x2 domain
    paths = spawn(_ensemble_on_meshes, 2, str(case["plain"]), str(case["store"]), str(case["root"]), meshes, 4,
                  timeout=240)[0]
    for path in paths:
        _assert_same_forecast(Path(path), case["one_at_a_time"])


def test_a_batched_rerun_keeps_a_partly_written_set_of_members(case, tmp_path, monkeypatch, batches):
    import launch.inference.forecaster as forecaster

    output, calls, written, interrupt = tmp_path / "resumed.zarr", [], [], [True]
    original = forecaster.write_region

    def write_then_fail(*args, **kwargs):
        calls.append(args[-1])
        if interrupt[0] and len(calls) == 5:  # in the second batch, after its members 1 and 2
            raise OSError("interrupted")
        written.extend((int(time), args[-1]) for time in args[3])
        original(*args, **kwargs)

    monkeypatch.setattr(forecaster, "write_region", write_then_fail)
    request = dict(dtype=torch.float64, progress=False, batch_size=5,
                   members=Members(MEMBERS, seed=3, input_noise=NOISE))
    with pytest.raises(OSError, match="interrupted"):
        run_forecast(case["plain"], case["store"], output, INIT, STEPS, **request)
    # the first batch is marked (member 0, and member 1 at init times 0 and 1); the second is not
    assert calls == [0, 1, 1, 2, 3]
    assert Progress(output).done() == {"0-0", "1-0", "2-0", "0-1", "1-1"} and not output.exists()
    written.clear()
    batches.clear()
    interrupt[0] = False
    run_forecast(case["plain"], case["store"], output, INIT, STEPS, **request)
    assert batches == [[1, 2, 2, 2, 3], [3, 3]]
    assert sorted(written) == sorted([(2, 1)] + [(time, member) for member in (2, 3) for time in range(3)])
    _assert_same_to_rounding(output, case["one_at_a_time"])


def test_a_rerun_with_another_request_starts_afresh(case, tmp_path):
    output = tmp_path / "changed.zarr"
    Progress(output).reset()
    Progress(output).mark([0, 1, 2], 0)  # a stale record of another request must not be trusted
    partial_path(output).mkdir()
    run_forecast(case["bayesian"], case["store"], output, INIT, STEPS, dtype=torch.float64, progress=False,
                 members=Members(MEMBERS, seed=3, input_noise=NOISE))
    _assert_same_forecast(output, case["serial"])


def test_refuses_members_that_do_not_fit_the_mesh(case, tmp_path, capsys):
    with pytest.raises(ForecastError, match="expected --members M"):
        Members().resolve({}, None, MeshConfig(sample=2))
    with pytest.raises(ForecastError, match="multiple of the sample ranks"):
        Members(3).resolve({}, None, MeshConfig(sample=2))
    code = forecast_main(["--checkpoint", str(case["bayesian"]), "--store", str(case["store"]), "--output",
                          str(tmp_path / "out.zarr"), "--init", INIT, "--steps", "1", "--members", "0"])
    assert code == 1 and "expected members >= 1" in capsys.readouterr().err



def _ensemble_analysis(store: Path, path: Path, members: int = 3) -> Path:
    """``store`` as an ensemble analysis: member k is the store's state plus k per channel."""
    dataset = xr.open_zarr(store, consolidated=False)
    attrs = dict(dataset.attrs)
    dynamic = [name for name in dataset.data_vars if "time" in dataset[name].dims]
    for name in dynamic:
        stacked = xr.concat([dataset[name] + k for k in range(members)], dim="member")
        dataset[name] = stacked.transpose("time", "member", ...).chunk({"time": 1, "member": 1})
        dataset[name].encoding = {}
    dataset = dataset.assign_coords(member=("member", np.arange(members)))
    dataset.attrs = {**attrs, "members": list(range(members))}
    dataset.to_zarr(path, zarr_format=3, consolidated=False)
    return path


def test_members_start_from_the_members_of_an_ensemble_analysis(case, tmp_path):
    analysis = _ensemble_analysis(case["store"], tmp_path / "analysis.zarr")
    checkpoint = make_checkpoint(analysis, tmp_path / "plain.pt")
    path = run_forecast(checkpoint, analysis, tmp_path / "ic.zarr", INIT, STEPS, dtype=torch.float64,
                        progress=False, members=Members(4, from_analysis=True))
    forecast = xr.open_zarr(path, consolidated=False)["2m_temperature"]
    truth = xr.open_zarr(analysis, consolidated=False)["t2m"].sel(time=forecast["time"].values)
    for member in range(4):  # member 3 starts from analysis member 0 again
        np.testing.assert_allclose(forecast.isel(prediction_timedelta=0, realization=member).values,
                                   truth.isel(member=member % 3).values, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(forecast.isel(realization=3).values, forecast.isel(realization=0).values)
    assert not np.allclose(forecast.isel(realization=1).values, forecast.isel(realization=0).values)
    with pytest.raises(ForecastError, match="--initial-members starts each of --members M"):
        run_forecast(checkpoint, case["store"], tmp_path / "no.zarr", INIT, STEPS, progress=False,
                     members=Members(2, from_analysis=True))
