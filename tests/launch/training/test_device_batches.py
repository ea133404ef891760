"""DeviceBatches hands out the micro-batches the prefetcher's samples make, in order, one staged ahead."""

from __future__ import annotations

import pytest
import torch

from data.process_prefetch import PREFETCHERS
from launch.training.device_batches import DeviceBatches
from launch.runtime.rank_inputs import RankInputs, config_for_store
from tests.data.store_fixtures import write_store
from weathermixer.config import preset
from weathermixer.model import WeatherMixer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> RankInputs:
    store = write_store(tmp_path_factory.mktemp("batches") / "store.zarr", n_times=9, n_lat=9, n_lon=16,
                        levels=(500, 850), tile_grid=(1, 1))
    model = WeatherMixer(config_for_store(preset("tiny"), str(store)))
    return RankInputs(str(store), model)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_micro_batches_follow_the_samples_and_drop_a_partial_one(inputs, kind):
    order = [5, 0, 3, 1, 6, 2, 4]  # lead 1: time indices 0..7 have a target
    with PREFETCHERS[kind](inputs.reader, order, lead_steps=1, depth=4, workers=2) as prefetcher:
        batches = DeviceBatches(prefetcher, inputs, micro_batch=2, device="cpu", dtype=torch.float32)
        taken = []
        for batch in batches:
            taken.append(batch)
            assert batches.taken == 2 * len(taken)  # the staged micro-batch is not counted
        assert len(taken) == len(order) // 2  # the last, partial micro-batch is dropped
        for k, got in enumerate(taken):
            expected = inputs.batch([inputs.reader.sample(t, 1) for t in order[2 * k:2 * k + 2]], "cpu",
                                    torch.float32)
            for a, b in zip(got.tensors(), expected):
                assert torch.equal(a, b)
            assert got.time_indices == tuple(order[2 * k:2 * k + 2])
