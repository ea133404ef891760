"""ReplicaSampler and valid_time_indices: replicas, determinism, exact resumption, gaps."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from data.sampler import ReplicaSampler, valid_time_indices


def epoch_of(n_replicas: int, epoch: int = 0, indices=23, **kwargs) -> list[list[int]]:
    """The index sequence of every replica for one epoch."""
    sequences = []
    for rank in range(n_replicas):
        sampler = ReplicaSampler(indices, replica_rank=rank, num_replicas=n_replicas, seed=7, **kwargs)
        sampler.set_epoch(epoch)
        sequences.append(list(sampler))
    return sequences


def test_ranks_of_one_replica_agree_and_replicas_are_disjoint():
    first, second = epoch_of(4), epoch_of(4)
    assert first == second  # every rank holding replica r (any domain/tensor position) draws the same
    assert all(len(sequence) == 23 // 4 for sequence in first)
    together = [i for sequence in first for i in sequence]
    assert len(set(together)) == len(together) == 20
    assert set(together) <= set(range(23))


def test_epochs_are_deterministic_per_seed_and_differ_between_epochs():
    valid = np.arange(100, 160, 3)
    sampler = ReplicaSampler(valid, replica_rank=0, num_replicas=1, seed=3)
    orders = {}
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.setdefault(epoch, []).append(list(sampler))
    assert orders[0][0] == orders[0][1]
    assert orders[0][0] != orders[1][0]
    assert sorted(orders[1][0]) == list(valid)
    other_seed = ReplicaSampler(valid, replica_rank=0, num_replicas=1, seed=4)
    assert list(other_seed) != orders[0][0]
    in_order = ReplicaSampler(valid, replica_rank=0, num_replicas=1, shuffle=False)
    assert list(in_order) == list(valid)


def test_without_drop_last_every_index_is_visited_and_replicas_stay_in_step():
    sequences = epoch_of(4, drop_last=False)
    assert all(len(sequence) == 6 for sequence in sequences)
    assert set(i for sequence in sequences for i in sequence) == set(range(23))
    assert len(ReplicaSampler(23, replica_rank=0, num_replicas=4, drop_last=False)) == 6


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_mid_epoch_continues_the_same_sequence(drop_last):
    full = epoch_of(3, epoch=2, drop_last=drop_last)
    for rank in range(3):
        sampler = ReplicaSampler(23, replica_rank=rank, num_replicas=3, seed=7, drop_last=drop_last)
        sampler.set_epoch(2)
        iterator = iter(sampler)
        head = [next(iterator) for _ in range(4)]
        state = sampler.state_dict()
        assert state["epoch"] == 2 and state["consumed"] == 12

        resumed = ReplicaSampler(23, replica_rank=rank, num_replicas=3, seed=7, drop_last=drop_last)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the usual loop calls this; it must keep the loaded position
        assert head + list(resumed) == full[rank]
        resumed.set_epoch(3)
        assert list(resumed) == epoch_of(3, epoch=3, drop_last=drop_last)[rank]


def test_consumed_accounts_for_indices_drawn_ahead():
    sampler = ReplicaSampler(20, replica_rank=1, num_replicas=2, seed=1)
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(5)]  # a prefetcher drew 5, the loop finished 3
    state = sampler.state_dict(consumed=3)
    resumed = ReplicaSampler(20, replica_rank=1, num_replicas=2, seed=1)
    resumed.load_state_dict(state)
    assert list(resumed)[:2] == drawn[3:]
    with pytest.raises(ValueError, match="consumed=6, but this iteration yielded 5"):
        sampler.state_dict(consumed=6)


def test_resume_with_a_different_number_of_replicas_visits_each_index_once():
    order = ReplicaSampler(24, replica_rank=0, num_replicas=1, seed=5).epoch_order()
    before = []
    for rank in range(2):
        sampler = ReplicaSampler(24, replica_rank=rank, num_replicas=2, seed=5)
        iterator = iter(sampler)
        before += [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    after = []
    for rank in range(3):
        resumed = ReplicaSampler(24, replica_rank=rank, num_replicas=3, seed=5)
        resumed.load_state_dict(state)
        after += list(resumed)
    assert sorted(before + after) == list(range(24))
    assert set(before) == set(order[:6])


def test_state_saved_at_the_end_of_an_epoch_resumes_into_the_next():
    sampler = ReplicaSampler(10, replica_rank=0, num_replicas=2, seed=2)
    list(sampler)
    resumed = ReplicaSampler(10, replica_rank=0, num_replicas=2, seed=2)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == []
    resumed.set_epoch(1)
    assert len(list(resumed)) == 5


def test_state_from_another_index_set_or_seed_is_refused():
    state = ReplicaSampler(10, replica_rank=0, num_replicas=2, seed=2).state_dict()
    with pytest.raises(ValueError, match="seed=2.*different sequence"):
        ReplicaSampler(10, replica_rank=0, num_replicas=2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="indices_fingerprint"):
        ReplicaSampler(np.arange(1, 11), replica_rank=0, num_replicas=2, seed=2).load_state_dict(state)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="replica_rank=2, num_replicas=2"):
        ReplicaSampler(10, replica_rank=2, num_replicas=2)
    with pytest.raises(ValueError, match="3 valid time indices for 4 replicas"):
        ReplicaSampler(3, replica_rank=0, num_replicas=4)


def test_valid_time_indices_respect_lead_period_and_gaps():
    times = np.array(["2017-12-31T00", "2017-12-31T06", "2017-12-31T12", "2017-12-31T18", "2018-01-01T00",
                      "2018-01-01T12", "2018-01-01T18", "2018-01-02T00"], dtype="datetime64[ns]")
    # index 4 -> 5 is a 12 h gap
    np.testing.assert_array_equal(valid_time_indices(times, 1), [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(valid_time_indices(times, 2), [0, 1, 2, 5])
    np.testing.assert_array_equal(valid_time_indices(times, 0), np.arange(8))
    # a date as end includes its whole day: targets up to 2017-12-31T18
    np.testing.assert_array_equal(valid_time_indices(times, 1, end="2017-12-31"), [0, 1, 2])
    np.testing.assert_array_equal(valid_time_indices(times, 1, start="2017-12-31T06", end="2018-01-01T00"), [1, 2, 3])
    np.testing.assert_array_equal(valid_time_indices(times, 1, start="2018-01-01"), [5, 6])
    np.testing.assert_array_equal(valid_time_indices(times, 2, step=np.timedelta64(12, "h")), [])
    assert valid_time_indices(times, 8).size == 0


def test_a_step_reads_the_same_times_for_any_number_of_replicas_at_one_global_batch():
    """The data order is the global batch's (as Megatron's sampler): step s of a global batch of G
    times reads the permutation's times s*G .. (s+1)*G - 1, whether 1, 2 or 4 replicas share them,
    also after resuming mid-epoch with another replica count."""
    global_batch, steps = 4, 5

    def steps_read(replicas: int, resume_at: int | None = None) -> list[set[int]]:
        samplers = [ReplicaSampler(23, replica_rank=r, num_replicas=replicas, seed=3) for r in range(replicas)]
        streams = [iter(s) for s in samplers]
        per_replica = global_batch // replicas
        read = [set().union(*({next(stream) for _ in range(per_replica)} for stream in streams))
                for _ in range(steps if resume_at is None else resume_at)]
        if resume_at is not None:  # continue on 4 replicas from this position
            state = samplers[0].state_dict()
            resumed = [ReplicaSampler(23, replica_rank=r, num_replicas=4, seed=3) for r in range(4)]
            for sampler in resumed:
                sampler.load_state_dict(state)
            streams = [iter(s) for s in resumed]
            read += [set().union(*({next(stream)} for stream in streams)) for _ in range(steps - resume_at)]
        return read

    order = ReplicaSampler(23, replica_rank=0, num_replicas=1, seed=3).epoch_order()
    expected = [set(order[s * global_batch:(s + 1) * global_batch].tolist()) for s in range(steps)]
    assert steps_read(1) == steps_read(2) == steps_read(4) == expected
    assert steps_read(2, resume_at=2) == expected


def steps_epoch_by_epoch(sampler: ReplicaSampler, samples_per_step: int, epochs: int) -> list[list[int]]:
    """The steps a loop over epochs makes: each epoch's indices in steps, a partial last step dropped."""
    steps = []
    for epoch in range(epochs):  # from epoch 0, or the position loaded in it
        sampler.set_epoch(epoch)
        indices = list(sampler)
        steps += [indices[k:k + samples_per_step] for k in range(0, len(indices) - samples_per_step + 1,
                                                                  samples_per_step)]
    return steps


def steps_of(stream, samples_per_step: int, n_steps: int) -> list[list[int]]:
    return [[next(stream) for _ in range(samples_per_step)] for _ in range(n_steps)]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("replicas, samples_per_step", [(1, 2), (1, 3), (3, 2), (4, 1)])
def test_the_stream_makes_the_steps_of_the_epochs_in_turn(drop_last, replicas, samples_per_step):
    for rank in range(replicas):
        make = partial(ReplicaSampler, 23, replica_rank=rank, num_replicas=replicas, seed=7, drop_last=drop_last)
        expected = steps_epoch_by_epoch(make(), samples_per_step, epochs=4)
        assert steps_of(make().stream(samples_per_step), samples_per_step, len(expected)) == expected
        # resumed mid-epoch: the rest of that epoch (cut to whole steps), then whole epochs
        head, tail = make(), make()
        iterator = iter(head)
        [next(iterator) for _ in range(2)]
        tail.load_state_dict(head.state_dict())
        expected = steps_epoch_by_epoch(tail, samples_per_step, epochs=3)
        tail.load_state_dict(head.state_dict())
        assert steps_of(tail.stream(samples_per_step), samples_per_step, len(expected)) == expected


def test_the_stream_follows_the_permutation_of_seed_and_epoch():
    indices = np.arange(100, 111)
    stream = ReplicaSampler(indices, replica_rank=1, num_replicas=2, seed=5).stream(samples_per_step=2)
    expected = []
    for epoch in range(3):  # 11 indices: 5 rounds of 2 replicas, replica 1's 5 cut to 2 steps of 2
        order = np.random.default_rng([5, epoch]).permutation(indices)
        expected += order[1:10:2][:4].tolist()
    assert [next(stream) for _ in range(12)] == expected


@pytest.mark.parametrize("replicas", [1, 3])
def test_a_stream_resumes_exactly_at_and_across_epoch_ends(replicas):
    """A checkpoint after any step (the last of an epoch among them), written while the stream has
    been drawn ahead into the next epoch, resumes to the same steps."""
    per_step, steps_per_epoch = 2, 23 // replicas // 2
    for rank in range(replicas):
        make = partial(ReplicaSampler, 23, replica_rank=rank, num_replicas=replicas, seed=7)
        full = [i for step in steps_of(make().stream(per_step), per_step, 3 * steps_per_epoch) for i in step]
        for done in range(0, 2 * steps_per_epoch + 1):
            sampler = make()
            stream = sampler.stream(per_step)
            [next(stream) for _ in range((done + 2) * per_step)]  # a prefetcher two steps ahead
            state = sampler.state_dict(consumed=done * per_step)
            assert state["epoch"] == max(done - 1, 0) // steps_per_epoch  # an epoch's last step stays in it
            resumed = make()
            resumed.load_state_dict(state)
            rest = resumed.stream(per_step)
            assert [next(rest) for _ in range(len(full) - done * per_step)] == full[done * per_step:]


def test_a_stream_needs_a_whole_step_in_an_epoch():
    with pytest.raises(ValueError, match="an epoch holds 3 time indices per replica, fewer than the 4 of one step"):
        ReplicaSampler(7, replica_rank=0, num_replicas=2).stream(samples_per_step=4)
    with pytest.raises(ValueError, match="samples_per_step must be >= 1, got 0"):
        ReplicaSampler(7, replica_rank=0, num_replicas=1).stream(samples_per_step=0)
