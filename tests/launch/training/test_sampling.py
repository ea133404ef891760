"""The sampling axis: S Monte Carlo samples on one rank equal S/k samples on each of k sample
ranks (the ELBO and every gradient of mu and rho), also with domain x tensor; sample ranks of
one data rank read the same times; a Bayesian run through the launcher with mesh.sample = 2
trains, logs NLL and KL, resumes bitwise and forecasts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from launch.training.config import RunConfigError, load_run_config
from tests.data.store_fixtures import write_store
from tests.distributed import spawn
from tests.launch.training.test_train import launch, losses, run_values

SAMPLES = 4
BAYESIAN = {"preset": "tiny", "overrides": {"hidden": 16, "bayesian": "all", "init_sigma": 0.05}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sampling") / "store.zarr"
    return write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                       upper_air=("z", "t"), tile_grid=(1, 2))


def step_values(store: Path, mesh: dict, samples: int, loss: str = "mse") -> dict:
    return {"model": BAYESIAN, "mesh": mesh,
            "data": {"store": str(store), "train": ["2020-01-01", "2020-01-05"]},
            "training": {"steps": 10, "micro_batch": 2, "samples": samples, "input_noise": 0.1, "kl_weight": 3.0,
                         "loss": loss},
            "deepspeed": "configs/deepspeed/zero0.json", "deepspeed_overrides": {"bf16": {"enabled": False}}}


def gradients_on_mesh(rank, world_size, store, mesh, samples, loss="mse"):
    """The ELBO and the full gradient of every parameter after one forward and backward."""
    import deepspeed
    import torch.distributed as dist

    from launch.runtime.rank_inputs import RankInputs
    from launch.training.device_batches import Batch
    from launch.training.step import TrainingStep
    from parallel.mesh import ProcessMesh
    from parallel.sharding import assemble_full_state

    deepspeed.init_distributed(dist_backend="gloo")
    run = load_run_config(values=step_values(store, mesh, samples, loss))
    process_mesh = ProcessMesh.build(run.mesh)
    step = TrainingStep.for_store(run, process_mesh, torch.device("cpu"))
    step.set_training_size(40)
    inputs = RankInputs(str(store), step.model)
    times = (3, 11)
    batch = Batch(*inputs.batch([inputs.reader.sample(t, 1) for t in times], "cpu"), times)
    losses = step.forward_backward(batch, 1, step=7)
    shards = [None] * world_size
    dist.all_gather_object(shards, {name: (p.shard.to_json(), p.grad.detach().double())
                                    for name, p in step.model.named_parameters()})
    model_ranks = {}  # one rank of each model rank: replicas hold the same (averaged) gradients
    for rank_shards, coordinates in zip(shards, gather_coordinates(process_mesh)):
        model_ranks.setdefault(coordinates, rank_shards)
    full = assemble_full_state(list(model_ranks.values()))
    return losses.tolist(), {name: value.numpy() for name, value in full.items()}  # plain arrays cross processes


def gather_coordinates(mesh):
    import torch.distributed as dist

    coordinates = [None] * dist.get_world_size()
    dist.all_gather_object(coordinates, mesh.model_rank)
    return coordinates


def serial_gradients(store, samples, loss):
    return spawn(gradients_on_mesh, 1, store, {}, samples, loss)[0]


@pytest.mark.parametrize("world_size,mesh,loss", [
    (2, {"sample": 2}, "mse"), (4, {"sample": 2, "tensor": 2}, "mse"), (4, {"sample": 4}, "mse"),
    (2, {"sample": 2}, "crps"), (4, {"sample": 2, "domain": [1, 2]}, "crps")],
    ids=["sample2", "sample2-tensor2", "sample4", "crps-sample2", "crps-sample2-domain1x2"])
def test_samples_on_sample_ranks_equal_samples_on_one_rank(store, world_size, mesh, loss):
    expected_losses, expected = serial_gradients(store, SAMPLES, loss)
    results = spawn(gradients_on_mesh, world_size, store, mesh, SAMPLES, loss)
    names = [name for name in expected if name.endswith("_rho")]
    assert names and all(abs(expected[name]).max() > 0 for name in names)  # the KL and the noise reach rho
    # float32 (DeepSpeed reduces no float64 gradients): sums in another order differ by rounding,
    # relative to the largest gradient element; a wrong draw or average differs by its own size
    scale = max(abs(value).max() for value in expected.values())
    for rank, (rank_losses, gradients) in enumerate(results):
        # (loss, data loss, kl): the MSE is each rank's own samples' (their mean is the serial one),
        # the CRPS the whole ensemble's on every rank
        assert rank_losses[2] == pytest.approx(expected_losses[2], rel=1e-6)
        if loss == "crps":
            assert rank_losses[1] == pytest.approx(expected_losses[1], rel=1e-6)
        for name, value in expected.items():
            error = float(abs(gradients[name] - value).max())
            assert error < 1e-5 * scale + 1e-3 * abs(value).max(), (
                f"rank {rank}: gradient of {name} differs by {error:.1e} (its largest element "
                f"{abs(value).max():.1e}, the model's {scale:.1e})")
    assert sum(r[0][1] for r in results) / world_size == pytest.approx(expected_losses[1], rel=1e-6)


def test_sample_ranks_of_a_data_rank_read_the_same_times():
    from types import SimpleNamespace

    from launch.training.loop import training_sampler

    def order(data_rank, sample_rank):
        mesh = SimpleNamespace(data_rank=data_rank, sample_rank=sample_rank, replica_rank=2 * data_rank + sample_rank,
                               replicas=4, config=SimpleNamespace(data=2, sample=2))
        sampler = training_sampler(list(range(40)), mesh, seed=5)
        sampler.set_epoch(2)
        return list(sampler)

    assert order(0, 0) == order(0, 1) and order(1, 0) == order(1, 1)  # sample ranks: the same times
    assert not set(order(0, 0)) & set(order(1, 0))  # data ranks: different times
    assert sorted(order(0, 0) + order(1, 0)) == list(range(40))


def test_sampling_config_errors_name_the_key(store):
    values = step_values(store, {"sample": 2}, 3)
    with pytest.raises(RunConfigError, match=r"training.samples = 3 does not divide over mesh.sample = 2"):
        load_run_config(values=values)
    deterministic = step_values(store, {}, 2)
    deterministic["model"] = {"preset": "tiny"}
    deterministic["training"]["input_noise"] = 0.0
    with pytest.raises(RunConfigError, match=r"deterministic model and no input noise"):
        load_run_config(values=deterministic)
    unknown = step_values(store, {}, 1)
    unknown["model"] = {"preset": "tiny", "overrides": {"bayesian": "encoder"}}
    with pytest.raises(RunConfigError, match=r"model.bayesian = 'encoder': unknown layer groups"):
        load_run_config(values=unknown)


def bayesian_run_values(store: Path, run_dir: Path, **sections) -> dict:
    values = run_values(store, run_dir, model=BAYESIAN, mesh={"sample": 2},
                        training={"samples": 2, "input_noise": 0.05, "kl_weight": 1.0})
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes}
    return values


@pytest.fixture(scope="module")
def bayesian_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bayesian")
    launch(2, bayesian_run_values(store, run_dir))
    return run_dir


def test_bayesian_run_on_two_sample_ranks_logs_nll_and_kl_and_checkpoints(bayesian_run):
    records = [json.loads(line) for line in (bayesian_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and all(r["kl"] > 0 and r["nll"] > 0 for r in steps)
    values = 9 * 16 * 6  # a sample's grid points x channels
    assert all(r["loss"] == pytest.approx(r["nll"] + r["kl"] / (6 * values), rel=1e-6) for r in steps)  # 6 times
    assert any("validation_loss" in r for r in records)
    assert (bayesian_run / "model.pt").exists()


def test_bayesian_run_resumes_bitwise(store, bayesian_run, tmp_path):
    launch(2, bayesian_run_values(store, tmp_path), "--stop-after", "3")
    launch(2, bayesian_run_values(store, tmp_path))
    assert losses(tmp_path) == losses(bayesian_run)


def test_bayesian_checkpoint_forecasts_its_mean_weights(store, bayesian_run, tmp_path):
    from launch.inference.forecaster import run_forecast
    from launch.training.checkpoint_format import load_consolidated

    state = load_consolidated(bayesian_run / "model.pt").state_dict
    assert any(name.endswith("weight_rho") for name in state)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    path = run_forecast(bayesian_run / "model.pt", store, tmp_path / "forecast.zarr", "2020-01-03T00", 2,
                        dtype=torch.float64, progress=False)
    import xarray as xr

    forecast = xr.open_zarr(path, consolidated=False)
    assert bool(forecast["2m_temperature"].notnull().all())


def test_hybrid_data_and_sample_run_trains(store, tmp_path):
    """data 2 x sample 2 on four processes: each data rank's two sample ranks share its batch."""
    launch(4, bayesian_run_values(store, tmp_path, mesh={"data": 2, "sample": 2}, training={"steps": 3}))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(r["kl"] > 0 for r in records if "loss" in r)


def test_crps_ensemble_of_a_deterministic_model_trains_on_two_sample_ranks(store, tmp_path):
    """Members from input noise alone, scored together by the almost fair CRPS."""
    values = run_values(store, tmp_path, mesh={"sample": 2}, training={
        "steps": 3, "samples": 4, "input_noise": 0.1, "loss": "crps", "crps_alpha": 0.95})
    launch(2, values)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["loss"] == r["crps"] > 0 for r in steps)
