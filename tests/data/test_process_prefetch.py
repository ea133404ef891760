"""ProcessPrefetcher: reader processes fill shared slots; the samples equal direct reads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.process_prefetch import ProcessPrefetcher
from data.reader import TileReader
from data.sampler import ReplicaSampler
from data.schema import StoreError
from tests.data.store_fixtures import write_store
from tests.data.test_prefetch import assert_same_sample

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("process_prefetch") / "s.zarr", n_times=8, n_lat=4, n_lon=6,
                       tile_grid=(1, 1))


@pytest.fixture(scope="module")
def reader(store):
    return TileReader(store, lat_range=(0, 4), lon_range=(0, 6))


@pytest.mark.filterwarnings("ignore::data.reader.ChunkAlignmentWarning")
def test_yields_the_direct_samples_in_order_and_reuses_released_slots(store):
    # a tile with rows beyond the store (zero padding) and a channel subset out of store order:
    # every reuse of a slot must leave the padded rows zero again
    reader = TileReader(store, lat_range=(2, 6), lon_range=(1, 5), channels=[5, 0, 2], model_lat=6)
    indices = [5, 0, 3, 3, 1, 2, 4, 0, 5]
    samples = []
    with ProcessPrefetcher(reader, indices, lead_steps=2, depth=3, workers=2) as prefetcher:
        held = next(prefetcher)  # kept while every other slot is reused several times
        for sample in prefetcher:
            assert_same_sample(sample, reader.sample(sample.time_index, lead_steps=2))
            samples.append(sample.time_index)
            prefetcher.release(sample)
        assert_same_sample(held, reader.sample(indices[0], lead_steps=2))
        assert prefetcher.delivered == len(indices)
        assert held.inputs[2:].abs().sum() == 0 and held.forcings[:, 2:].abs().sum() == 0  # padded rows
    assert [held.time_index] + samples == indices
    assert not prefetcher.reading


@pytest.mark.filterwarnings("ignore::data.reader.ChunkAlignmentWarning")
def test_each_sample_is_read_with_the_lead_of_its_position_into_its_slot(store):
    reader = TileReader(store, lat_range=(2, 6), lon_range=(1, 5), channels=[5, 0, 2], model_lat=6)
    indices = [5, 0, 3, 6, 1, 2, 4, 6]
    # index 6 has one following time only: the reader processes must read lead 1 into the slot of
    # lead 2, not the whole slot, or it fails; slots hold long and short samples in turn
    leads = [2, 0, 2, 1, 2, 2, 1, 1]
    with ProcessPrefetcher(reader, indices, lambda position: leads[position], depth=3, workers=2,
                           max_lead_steps=2) as prefetcher:
        for sample, index, lead in zip(prefetcher, indices, leads):
            assert sample.time_index == index and len(sample.targets) == lead and len(sample.forcings) == lead + 1
            assert_same_sample(sample, reader.sample(index, lead))
            prefetcher.release(sample)
        assert prefetcher.delivered == len(indices)


def test_reader_error_reaches_the_consumer_in_place(reader):
    prefetcher = ProcessPrefetcher(reader, [0, 1, 7, 2], lead_steps=1, depth=2, workers=2)
    for expected in (0, 1):
        sample = next(prefetcher)
        assert sample.time_index == expected
        prefetcher.release(sample)
    with pytest.raises(IndexError, match="needs time indices 7..8") as raised:
        next(prefetcher)
    notes = "\n".join(raised.value.__notes__)
    assert "prefetching time index 7" in notes and "reader process traceback" in notes and reader.store in notes
    assert not prefetcher.reading
    with pytest.raises(StopIteration):
        next(prefetcher)


def test_error_in_the_index_source_reaches_the_consumer(reader):
    def indices():
        yield 3
        raise RuntimeError("sampler broke")

    with ProcessPrefetcher(reader, indices(), depth=2) as prefetcher:
        assert next(prefetcher).time_index == 3
        with pytest.raises(RuntimeError, match="sampler broke") as raised:
            next(prefetcher)
    assert "drawing the next time index" in raised.value.__notes__[0]


def test_holding_every_slot_is_an_error_not_a_hang(reader):
    with ProcessPrefetcher(reader, range(6), depth=2) as prefetcher:
        first, second = next(prefetcher), next(prefetcher)
        with pytest.raises(RuntimeError, match="all 2 slots hold delivered samples; call release"):
            next(prefetcher)
    with pytest.raises(ValueError, match="is not a sample this prefetcher delivered"):
        prefetcher.release(TileReader.sample(reader, 0))
    assert first.time_index == 0 and second.time_index == 1


def test_a_reader_process_that_dies_is_reported(reader):
    with ProcessPrefetcher(reader, range(6), depth=2, workers=1) as prefetcher:
        prefetcher.release(next(prefetcher))
        worker = prefetcher._workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(RuntimeError, match=r"reader process .* ended with exit code -9"):
            while True:
                prefetcher.release(next(prefetcher))


def test_a_store_that_vanished_before_the_processes_opened_it(tmp_path, reader):
    copy = shutil.copytree(reader.store, tmp_path / "copy.zarr")
    moved = TileReader(copy, lat_range=(0, 4), lon_range=(0, 6))
    shutil.rmtree(copy)
    with pytest.raises(StoreError, match="cannot open as a zarr group") as raised:
        with ProcessPrefetcher(moved, range(4)) as prefetcher:
            next(prefetcher)
    assert any("while a reader process opened" in note for note in raised.value.__notes__)


def test_arguments_are_checked(store):
    reader = TileReader(store, lat_range=(0, 4), lon_range=(0, 6), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be float32"):
        ProcessPrefetcher(reader, range(4))
    with pytest.raises(ValueError, match="workers must lie in 1..depth=2"):
        ProcessPrefetcher(TileReader(store, lat_range=(0, 4), lon_range=(0, 6)), range(4), depth=2, workers=3)


def test_slots_that_do_not_fit_shared_memory_are_refused(reader, monkeypatch):
    import data.process_prefetch as process_prefetch

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(process_prefetch.os, "statvfs", lambda path: Full())
    with pytest.raises(ValueError, match=r"2 slots need .* GiB of shared memory, /dev/shm has 0.00 GiB free"):
        ProcessPrefetcher(reader, range(4), depth=2)


def exited(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # a zombie has exited (nobody may reap it in a container)


def test_readers_of_a_killed_consumer_exit(reader):
    script = ("import time\n"
              "from data.reader import TileReader\nfrom data.process_prefetch import ProcessPrefetcher\n"
              "if __name__ == '__main__':\n"
              f"    reader = TileReader({reader.store!r}, lat_range=(0, 4), lon_range=(0, 6))\n"
              "    prefetcher = ProcessPrefetcher(reader, range(7), depth=2, workers=2)\n"
              "    next(prefetcher)\n"
              "    print(*(w.pid for w in prefetcher._workers), flush=True)\n"
              "    time.sleep(600)\n")
    consumer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        pids = [int(pid) for pid in consumer.stdout.readline().split()]
        assert len(pids) == 2 and not any(exited(pid) for pid in pids)
    finally:
        consumer.kill()
        consumer.wait()
    deadline = time.monotonic() + 30
    while not all(exited(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(exited(pid) for pid in pids)


def test_a_stream_over_epochs_is_read_on_across_their_ends(reader):
    sampler = ReplicaSampler(5, replica_rank=0, num_replicas=1, seed=2)
    expected = [i for epoch in range(3) for i in ReplicaSampler(5, replica_rank=0, num_replicas=1, seed=2)
                .epoch_order(epoch)[:4].tolist()]  # steps of 2: each epoch's fifth index makes no step
    with ProcessPrefetcher(reader, sampler.stream(samples_per_step=2), depth=3, workers=2) as prefetcher:
        samples = []
        for _ in expected:
            sample = next(prefetcher)
            assert_same_sample(sample, reader.sample(sample.time_index))
            samples.append(sample.time_index)
            prefetcher.release(sample)
        assert prefetcher.reading
    assert samples == expected
