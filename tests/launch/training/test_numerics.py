"""Numerics of the shipped configurations, through the real launcher on CPU ranks.

* ZeRO-1 and ZeRO-2 with model parallelism *and* several replicas (data 2 x domain 1x2) give the
  losses of one process (float32);
* DeepSpeed's bf16 mode (ZeRO-1, float32 master weights) follows the float32 run over 300 steps:
  the mean loss of the last 50 steps within 0.5 %, every step's within 2 % (measured: 4e-5 and
  0.2 % on the tiny model);
* a NaN in the store: ``training.nonfinite_loss = stop`` ends the run naming the step, the rank and
  the channel, ``skip`` leaves those steps' updates out, warns the same way and trains on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from launch.training.checkpoint_format import load_consolidated
from launch.training.step import FINITE, nonfinite_channel
from tests.data.store_fixtures import write_store
from tests.launch.training.test_train import STEPS, launch, launch_together, losses, run_values


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_model_parallelism_and_replicas_equals_serial(store, serial_run, tmp_path, stage):
    """Two replicas of micro-batch 1, each split into two longitude tiles: four processes."""
    values = run_values(store, tmp_path, mesh={"data": 2, "domain": [1, 2]}, training={"micro_batch": 1},
                        deepspeed=f"configs/deepspeed/zero{stage}.json", data={"workers": 1, "prefetch": 2})
    launch(4, values)
    parallel, serial = losses(tmp_path), losses(serial_run)
    assert len(parallel) == STEPS
    assert max(abs(a - b) / abs(b) for a, b in zip(parallel, serial)) < 1e-5, (parallel, serial)


def test_deepspeed_bf16_follows_float32_over_300_steps(store, tmp_path):
    long = {"steps": 300, "micro_batch": 2, "rollout": [{"from_step": 0, "steps": 1}]}
    common = dict(training=long, logging={"every": 1, "validate_every": 10**6, "tensorboard": False},
                  schedule={"warmup_steps": 20}, optimizer={"lr": 1e-3, "embedding_lr": 1e-3},
                  deepspeed="configs/deepspeed/zero1.json")
    # the two one-process runs are independent: at once, on the two cores
    launch_together(
        (1, run_values(store, tmp_path / "fp32", checkpoint={"dir": str(tmp_path / "fp32"), "every": 10**6},
                       **common)),
        (1, run_values(store, tmp_path / "bf16", checkpoint={"dir": str(tmp_path / "bf16"), "every": 10**6},
                       deepspeed_overrides={"bf16": {"enabled": True}}, **common)))
    fp32, bf16 = np.array(losses(tmp_path / "fp32")), np.array(losses(tmp_path / "bf16"))
    assert len(fp32) == len(bf16) == 300
    assert fp32[-50:].mean() < 0.8 * fp32[:10].mean(), "the float32 run does not learn"
    assert abs(bf16[-50:].mean() / fp32[-50:].mean() - 1) < 0.005, (bf16[-50:].mean(), fp32[-50:].mean())
    assert np.max(np.abs(bf16 / fp32 - 1)) < 0.02, np.max(np.abs(bf16 / fp32 - 1))
    assert np.max(np.abs(bf16 / fp32 - 1)) > 1e-4  # it did run in bf16


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory) -> Path:
    """A store whose t2m holds a NaN at one grid point of 2020-01-01T18 (time index 3)."""
    path = tmp_path_factory.mktemp("nan") / "store.zarr"
    write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                upper_air=("z", "t"), tile_grid=(1, 2))
    zarr.open_group(str(path), mode="r+")["t2m"][3, 4, 12] = np.nan  # the second longitude tile
    return path


NAMED = (r"step (\d+): the training loss is nan; rank 1 \(data 0, sample 0, domain 1, tensor 0\): the "
         r"(inputs|targets) of channel t2m hold NaN or Inf \(samples at 2020-01-0[12]T[0-9:, T-]+\)")


def test_a_nan_loss_stops_the_run_naming_step_rank_and_channel(nan_store, tmp_path):
    result = launch(2, run_values(nan_store, tmp_path, mesh={"domain": [1, 2]}), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert len(re.findall(rf"launch/train.py: {NAMED}.*stopping before the next checkpoint", output)) == 1, \
        output[-3000:]


def test_skipping_non_finite_steps_trains_on_and_warns(nan_store, tmp_path):
    values = run_values(nan_store, tmp_path, mesh={"domain": [1, 2]}, training={"nonfinite_loss": "skip"})
    result = launch(2, values)
    skipped = {int(step) for step, _ in re.findall(rf"warning: {NAMED}.*update was left out", result.stderr)}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    nan_steps = {r["step"] for r in records if "loss" in r and not np.isfinite(r["loss"])}
    assert skipped and skipped == nan_steps, (skipped, nan_steps, result.stderr[-3000:])
    assert len(nan_steps) < STEPS  # the other steps trained
    weights = load_consolidated(tmp_path / "model.pt").state_dict
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached the weights


def test_skipping_stops_a_run_whose_every_step_is_non_finite(tmp_path_factory, tmp_path):
    """t2m NaN at one grid point of every time: ``skip`` leaves out the first nine steps with a
    warning each, and the tenth in a row stops the run (diverged), naming it, without a traceback."""
    path = tmp_path_factory.mktemp("all-nan") / "store.zarr"
    write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                upper_air=("z", "t"), tile_grid=(1, 2))
    zarr.open_group(str(path), mode="r+")["t2m"][:, 4, 12] = np.nan
    values = run_values(path, tmp_path, training={"nonfinite_loss": "skip", "steps": 14},
                        checkpoint={"dir": str(tmp_path), "every": 100})
    result = launch(1, values, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    warned = re.findall(r"warning: step (\d+): the training loss is nan.*update was left out", result.stderr)
    assert [int(step) for step in warned] == list(range(1, 10)), (warned, output[-3000:])
    assert len(re.findall(r"step 10: the training loss is nan.*10 steps in a row: the run diverged", output)) == 1, \
        output[-3000:]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_channel_names_the_smallest_bad_channel(bad, dtype):
    """Each kind of non-finite value in one channel, in a strided view (targets are a slice of
    the batch's leads); the answer is the smallest global index, FINITE when all are finite."""
    channels = torch.tensor([3, 7, 11, 12])
    values = torch.randn(2, 4, 5, 6, 4, dtype=dtype)[:, :3]
    assert int(nonfinite_channel(values, channels)) == FINITE
    values[1, 2, 4, 5, 2] = bad
    assert int(nonfinite_channel(values, channels)) == 11
    values[0, 0, 0, 0, 3] = bad
    values[0, 1, 3, 2, 1] = -bad
    assert int(nonfinite_channel(values, channels)) == 7
