"""DeviceBatches hands out the micro-batches the prefetcher's samples make, in order, one staged ahead;
their lead follows the samples', which the trainer reads with the rollout of each one's step."""

from __future__ import annotations

import pytest
import torch

from data.process_prefetch import PREFETCHERS
from data.sampler import ReplicaSampler, valid_time_indices
from launch.training.config import TrainingSection
from launch.training.device_batches import DeviceBatches
from launch.training.loop import sample_leads
from launch.runtime.rank_inputs import RankInputs, config_for_store
from tests.data.store_fixtures import write_store
from tests.data.test_prefetch import RecordingReader
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


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_the_lead_may_change_between_micro_batches(inputs, kind):
    order = [5, 0, 3, 1, 6, 2, 4, 0]
    leads = [1, 1, 2, 2, 0, 0, 2, 2]  # micro-batches of lead 1, 2, 0, 2
    with PREFETCHERS[kind](inputs.reader, order, lambda position: leads[position], depth=4, workers=2,
                           max_lead_steps=2) as prefetcher:
        taken = list(DeviceBatches(prefetcher, inputs, micro_batch=2, device="cpu", dtype=torch.float32))
    assert [batch.targets.shape[1] for batch in taken] == [1, 2, 0, 2]
    for k, got in enumerate(taken):
        lead = leads[2 * k]
        expected = inputs.batch([inputs.reader.sample(t, lead) for t in order[2 * k:2 * k + 2]], "cpu", torch.float32)
        for a, b in zip(got.tensors(), expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_micro_batch_of_mixed_leads_is_refused(inputs, kind):
    with PREFETCHERS[kind](inputs.reader, [5, 0, 3, 1], lambda position: 1 + position % 2, depth=4, workers=2,
                           max_lead_steps=2) as prefetcher:
        with pytest.raises(ValueError, match=r"same lead .* got leads \[1, 2\] for time indices \[5, 0\]"):
            DeviceBatches(prefetcher, inputs, micro_batch=2, device="cpu", dtype=torch.float32)


# rollout 1 in steps 0-2, 2 from step 3; 4 samples a step in 2 micro-batches
TWO_PHASES = TrainingSection(steps=6, micro_batch=2, gradient_accumulation=2,
                             rollout=[{"from_step": 0, "steps": 1}, {"from_step": 3, "steps": 2}])


def train_reads(inputs, kind, sampler, first_step):
    """Steps ``first_step``..5 as the trainer reads them: each step's micro-batches, the reader's
    ``(time index, lead)`` asks in order (the thread kind; one thread reads in order) and the
    sampler's state after the first of these steps."""
    t = TWO_PHASES
    reader = RecordingReader(inputs.reader) if kind == "thread" else inputs.reader
    workers = 1 if kind == "thread" else 2
    with PREFETCHERS[kind](reader, sampler.stream(t.micro_batch * t.gradient_accumulation),
                           sample_leads(t, first_step), depth=4, workers=workers,
                           max_lead_steps=t.max_rollout) as prefetcher:
        batches = DeviceBatches(prefetcher, inputs, t.micro_batch, device="cpu", dtype=torch.float32)
        steps, state = {}, None
        for step in range(first_step, t.steps):
            steps[step] = [next(batches) for _ in range(t.gradient_accumulation)]
            state = state or sampler.state_dict(consumed=batches.taken)
    return steps, getattr(reader, "asked", None), state


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_each_step_reads_its_own_rollout_also_after_a_resume_within_a_phase(inputs, kind):
    def sampler():  # 7 training times of lead 2: one step an epoch, so steps cross epochs too
        return ReplicaSampler(valid_time_indices(inputs.reader.times, TWO_PHASES.max_rollout), replica_rank=0,
                              num_replicas=1, seed=4)

    whole, asked, after_step_0 = train_reads(inputs, kind, sampler(), first_step=0)
    resumed_sampler = sampler()
    resumed_sampler.load_state_dict(after_step_0)
    resumed, resumed_asked, _ = train_reads(inputs, kind, resumed_sampler, first_step=1)
    for step, micro_batches in whole.items():
        assert [batch.targets.shape[1] for batch in micro_batches] == [1 if step < 3 else 2] * 2, step
    if asked is not None:  # the reader was asked for those leads, not the longest rollout's
        assert [lead for _, lead in asked[:24]] == [1] * 12 + [2] * 12
        assert [lead for _, lead in resumed_asked[:20]] == [1] * 8 + [2] * 12
        assert [index for index, _ in resumed_asked[:20]] == [index for index, _ in asked[4:24]]
    for step, micro_batches in resumed.items():  # the same samples and values as the whole run's
        for got, expected in zip(micro_batches, whole[step]):
            assert got.time_indices == expected.time_indices
            for a, b in zip(got.tensors(), expected.tensors()):
                assert torch.equal(a, b)
