"""Prefetcher: same samples in the same order as direct reads; errors and early exits; reading on
across an epoch's end."""

from __future__ import annotations

import threading

import pytest
import torch

from data.prefetch import Prefetcher
from data.reader import TileReader
from data.sampler import ReplicaSampler
from tests.data.store_fixtures import write_store


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    path = write_store(tmp_path_factory.mktemp("prefetch") / "s.zarr", n_times=8, n_lat=4, n_lon=6, tile_grid=(1, 1))
    return TileReader(path, lat_range=(0, 4), lon_range=(0, 6))


def assert_same_sample(actual, expected):
    for name in ("inputs", "targets", "static", "forcings"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0)
    assert actual.time == expected.time and actual.time_index == expected.time_index


@pytest.mark.parametrize("depth,workers", [(1, 1), (3, 1), (4, 3)])
def test_yields_the_direct_samples_in_order(reader, depth, workers):
    indices = [5, 0, 3, 3, 1, 2, 4, 0]
    with Prefetcher(reader, indices, lead_steps=2, depth=depth, workers=workers) as prefetcher:
        samples = list(prefetcher)
    assert [s.time_index for s in samples] == indices
    for sample, index in zip(samples, indices):
        assert_same_sample(sample, reader.sample(index, lead_steps=2))
    assert prefetcher.delivered == len(indices)


@pytest.mark.parametrize("workers", [1, 2])
def test_reader_error_reaches_the_consumer_in_place_with_context(reader, workers):
    prefetcher = Prefetcher(reader, [0, 1, 7, 2], lead_steps=1, workers=workers)
    assert [next(prefetcher).time_index for _ in range(2)] == [0, 1]
    with pytest.raises(IndexError, match="needs time indices 7..8") as raised:
        next(prefetcher)
    assert any("prefetching time index 7" in note and reader.store in note for note in raised.value.__notes__)
    assert not prefetcher.reading
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_error_in_the_index_source_reaches_the_consumer(reader):
    def indices():
        yield 0
        raise RuntimeError("sampler broke")

    with Prefetcher(reader, indices()) as prefetcher:
        assert next(prefetcher).time_index == 0
        with pytest.raises(RuntimeError, match="sampler broke") as raised:
            next(prefetcher)
    assert "drawing the next time index" in raised.value.__notes__[0]


def test_leaving_early_stops_the_thread(reader):
    with Prefetcher(reader, range(6), depth=1) as prefetcher:
        first = next(prefetcher)
    assert first.time_index == 0
    assert not prefetcher.reading
    with pytest.raises(StopIteration):
        next(prefetcher)


class RecordingReader:
    """Reads through ``reader`` and records each ``(time_index, lead_steps)`` it is asked for."""

    def __init__(self, reader: TileReader):
        self.reader, self.store = reader, reader.store
        self.asked: list[tuple[int, int]] = []

    def sample(self, time_index: int, lead_steps: int = 1):
        self.asked.append((time_index, lead_steps))
        return self.reader.sample(time_index, lead_steps)


@pytest.mark.parametrize("workers", [1, 3])
def test_each_sample_is_read_with_the_lead_of_its_position(reader, workers):
    indices = [5, 0, 3, 6, 1, 2, 4]
    leads = [2, 2, 1, 1, 0, 2, 1]  # index 6 has one following time only: lead 1 fits, 2 would not
    recording = RecordingReader(reader)
    with Prefetcher(recording, indices, lambda position: leads[position], depth=3, workers=workers,
                    max_lead_steps=2) as prefetcher:
        samples = list(prefetcher)
    assert sorted(recording.asked) == sorted(zip(indices, leads))
    for sample, index, lead in zip(samples, indices, leads):
        assert len(sample.targets) == lead
        assert_same_sample(sample, reader.sample(index, lead))


def test_a_lead_beyond_max_lead_steps_reaches_the_consumer_in_place(reader):
    with Prefetcher(reader, [0, 1, 2], lambda position: position + 1, depth=2, max_lead_steps=2) as prefetcher:
        assert [len(next(prefetcher).targets) for _ in range(2)] == [1, 2]
        with pytest.raises(ValueError, match=r"lead of sample 2 \(time index 2\) is 3, expected 0..max_lead_steps=2"):
            next(prefetcher)


def test_leads_are_checked(reader):
    with pytest.raises(ValueError, match="a lead per position .* needs max_lead_steps >= 0"):
        Prefetcher(reader, range(4), lambda position: 1)
    with pytest.raises(ValueError, match=r"lead_steps must lie in 0..max_lead_steps=1, got 2"):
        Prefetcher(reader, range(4), 2, max_lead_steps=1)


def test_workers_must_fit_the_depth(reader):
    with pytest.raises(ValueError, match="workers must lie in 1..depth=2"):
        Prefetcher(reader, range(4), depth=2, workers=3)


def test_resume_from_delivered_samples_with_a_sampler(reader):
    sampler = ReplicaSampler(7, replica_rank=0, num_replicas=1, seed=11)
    expected = list(ReplicaSampler(7, replica_rank=0, num_replicas=1, seed=11))
    with Prefetcher(reader, sampler, depth=3) as prefetcher:
        head = [next(prefetcher).time_index for _ in range(2)]
        state = sampler.state_dict(consumed=prefetcher.delivered)
    resumed = ReplicaSampler(7, replica_rank=0, num_replicas=1, seed=11)
    resumed.load_state_dict(state)
    with Prefetcher(reader, resumed) as prefetcher:
        tail = [sample.time_index for sample in prefetcher]
    assert head + tail == expected


class GatedReader:
    """Reads through ``reader``; the read of ``last`` (once in an epoch) waits until ``first`` has been
    asked for a second time, i.e. in the next epoch: a prefetcher that did not ask for the next
    epoch's samples before delivering the current epoch's last one fails here, without a hang."""

    def __init__(self, reader: TileReader, last: int, first: int):
        self.reader, self.store, self.last, self.first = reader, reader.store, last, first
        self.asked: list[int] = []
        self.next_epoch_asked = threading.Event()

    def sample(self, time_index: int, lead_steps: int = 1):
        self.asked.append(time_index)
        if time_index == self.first and self.asked.count(self.first) == 2:
            self.next_epoch_asked.set()
        if time_index == self.last and not self.next_epoch_asked.wait(timeout=60):
            raise TimeoutError(f"the next epoch's first time index {self.first} was not asked for while the "
                               f"epoch's last, {self.last}, was being read (asked: {self.asked})")
        return self.reader.sample(time_index, lead_steps)


def test_the_next_epochs_first_samples_are_read_before_the_epoch_ends(reader):
    sampler = ReplicaSampler(7, replica_rank=0, num_replicas=1, seed=3)  # every index once an epoch
    epochs = [ReplicaSampler(7, replica_rank=0, num_replicas=1, seed=3).epoch_order(epoch).tolist()
              for epoch in range(2)]
    gated = GatedReader(reader, last=epochs[0][-1], first=epochs[1][0])
    with Prefetcher(gated, sampler.stream(), lead_steps=1, depth=3, workers=2) as prefetcher:
        delivered = [next(prefetcher).time_index for _ in range(10)]
        assert sampler.state_dict(consumed=prefetcher.delivered)["epoch"] == 1
    assert delivered == epochs[0] + epochs[1][:3]
    assert gated.next_epoch_asked.is_set()
