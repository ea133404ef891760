"""Which time indices each model replica trains on, epoch by epoch, resumably.

Under Jigsaw parallelism one sample is spread over all ranks of a model replica (the
domain x tensor group): every one of them must read the same time index at the same step,
each its own tile and channel slice. Different replicas (the data axis) must see disjoint
samples. So the sampler is keyed by the *replica* rank, not the global rank: the
launcher passes the rank of the replica among all replicas and their number.

Each epoch is a permutation of the valid indices drawn from ``(seed, epoch)`` alone, dealt
round-robin to the replicas. The trainer draws one endless stream, epoch after epoch, so that
its readers read the next epoch's first samples while the current epoch's last steps compute.
Resumption is exact: the state records the epoch and how many of its indices all replicas
together have consumed; a resumed run continues the same permutation from there (with the
same or a different number of replicas).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np


def valid_time_indices(times: np.ndarray, lead_steps: int, start: str | np.datetime64 | None = None,
                       end: str | np.datetime64 | None = None, step: np.timedelta64 | None = None) -> np.ndarray:
    """Indices ``t`` whose window ``times[t .. t + lead_steps]`` is gap-free and inside the period.

    ``start``/``end`` bound the period inclusively; a date without a time of day (``"2017-12-31"``)
    includes that whole day. Both the input time and the last target time must lie inside,
    so a training period never lends targets from a validation period. ``step`` is the
    regular time step (default: the smallest difference in ``times``); a window whose span
    is not ``lead_steps * step`` crosses a gap and is left out.
    """
    times = np.asarray(times).astype("datetime64[ns]")
    if times.ndim != 1:
        raise ValueError(f"valid_time_indices: times must be 1-D, got shape {times.shape}")
    if lead_steps < 0:
        raise ValueError(f"valid_time_indices: lead_steps must be >= 0, got {lead_steps}")
    n_windows = len(times) - lead_steps
    if n_windows <= 0:
        return np.zeros(0, dtype=np.int64)
    if step is None:
        step = np.diff(times).min() if len(times) > 1 else np.timedelta64(0, "ns")
    first, last = times[:n_windows], times[lead_steps:]
    valid = (last - first) == lead_steps * np.timedelta64(step, "ns")
    if start is not None:
        valid &= first >= np.datetime64(start, "ns")
    if end is not None:
        valid &= last <= _inclusive_end(end)
    return np.flatnonzero(valid).astype(np.int64)


def _inclusive_end(end: str | np.datetime64) -> np.datetime64:
    end = np.datetime64(end)
    if np.datetime_data(end.dtype)[0] in ("Y", "M", "W", "D"):
        # a calendar date means "through the end of that day (month, year)"
        unit = np.datetime_data(end.dtype)[0]
        return (end + np.timedelta64(1, unit)).astype("datetime64[ns]") - np.timedelta64(1, "ns")
    return end.astype("datetime64[ns]")


class ReplicaSampler:
    """Time indices for one model replica; all ranks of the replica get the same sequence.

    Args:
        indices: the valid time indices (e.g. from :func:`valid_time_indices`), or an int
            ``n`` for ``range(n)``.
        replica_rank: rank of this replica among all replicas (data x sample position of the
            rank in the mesh), ``0 <= replica_rank < num_replicas``.
        num_replicas: number of model replicas reading different samples.
        seed: seed of the epoch permutations; every rank must pass the same one.
        shuffle: permute each epoch (False: the given order).
        drop_last: drop the epoch's last ``len % num_replicas`` indices so that every
            replica gets the same count; False instead repeats indices from the start of
            the epoch to fill the last round. Either way all replicas run the same
            number of steps, which collectives across replicas need.

    The training loop draws :meth:`stream`, which never ends: each epoch's indices cut to whole
    steps, then the next epoch's, so a prefetcher reads across the epoch's end; it passes how many
    indices it has finished with to :meth:`state_dict` for a checkpoint::

        for time_index in sampler.stream(samples_per_step):
            ...
            state = sampler.state_dict(consumed=indices_done)

    Iterating the sampler itself gives the rest of one epoch (``set_epoch`` selects it and keeps a
    position loaded from a checkpoint of that epoch).
    """

    def __init__(self, indices: int | Sequence[int] | np.ndarray, *, replica_rank: int, num_replicas: int,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True) -> None:
        self.indices = np.arange(indices, dtype=np.int64) if np.ndim(indices) == 0 \
            else np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"ReplicaSampler: indices must be 1-D, got shape {self.indices.shape}")
        if num_replicas < 1 or not 0 <= replica_rank < num_replicas:
            raise ValueError(f"ReplicaSampler: need 0 <= replica_rank < num_replicas, got replica_rank="
                             f"{replica_rank}, num_replicas={num_replicas}")
        if seed < 0:
            raise ValueError(f"ReplicaSampler: seed must be >= 0, got {seed}")
        if drop_last and len(self.indices) < num_replicas:
            raise ValueError(f"ReplicaSampler: {len(self.indices)} valid time indices for {num_replicas} replicas; "
                             f"with drop_last=True every replica would get none")
        self.replica_rank = int(replica_rank)
        self.num_replicas = int(num_replicas)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._fingerprint = hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]
        self._epoch, self._start = 0, 0  # where the next iteration starts (start: consumed count, all replicas)
        self._origin = (0, 0)  # (epoch, start) of the current iteration, before it yields
        self._passes: list[tuple[int, int, int]] = []  # (epoch, start, this replica's count) of each pass begun
        self._yielded = 0  # indices this replica yielded in the current iteration

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation for the next iteration; a new epoch starts at its beginning.

        Setting the epoch already set (e.g. the one just loaded from a checkpoint) keeps
        the position, so a resumed loop can call ``set_epoch`` as usual.
        """
        if epoch < 0:
            raise ValueError(f"ReplicaSampler.set_epoch: epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._move_to(int(epoch), 0)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """All valid indices in the order of ``epoch`` (default: the selected one), before dealing."""
        epoch = self._epoch if epoch is None else epoch
        if not self.shuffle:
            return self.indices.copy()
        return np.random.default_rng([self.seed, epoch]).permutation(self.indices)

    def __len__(self) -> int:
        """Indices per replica in a whole epoch."""
        n, replicas = len(self.indices), self.num_replicas
        return n // replicas if self.drop_last else -(-n // replicas)

    def __iter__(self) -> Iterator[int]:
        """The rest of the selected epoch's indices for this replica."""
        return self._iterate([self._epoch], samples_per_step=1)

    def stream(self, samples_per_step: int = 1) -> Iterator[int]:
        """This replica's indices from the current position on, epoch after epoch, without end.

        Each epoch's pass is cut to whole steps of ``samples_per_step`` indices (the rest would
        make a partial step, which is dropped), so no step mixes two epochs and the next epoch's
        first indices follow the current one's last step at once.
        """
        if samples_per_step < 1:
            raise ValueError(f"ReplicaSampler.stream: samples_per_step must be >= 1, got {samples_per_step}")
        if len(self) < samples_per_step:
            raise ValueError(f"ReplicaSampler.stream: an epoch holds {len(self)} time indices per replica, fewer "
                             f"than the {samples_per_step} of one step: no epoch would make a step; use more "
                             f"training times or a smaller micro_batch x gradient_accumulation")
        return self._iterate(itertools.count(self._epoch), samples_per_step)

    def _iterate(self, epochs: Iterable[int], samples_per_step: int) -> Iterator[int]:
        self._origin, self._passes, self._yielded = (self._epoch, self._start), [], 0
        self._start = 0  # a later iteration starts the epoch from its beginning
        return self._yield(epochs, self._origin[1], samples_per_step)

    def _yield(self, epochs: Iterable[int], start: int, samples_per_step: int) -> Iterator[int]:
        for epoch in epochs:
            mine = self._deal(self.epoch_order(epoch), start)
            mine = mine[:len(mine) - len(mine) % samples_per_step]
            self._passes.append((epoch, start, len(mine)))
            for index in mine:
                self._yielded += 1  # counted before the consumer uses it; see state_dict(consumed=...)
                yield int(index)
            start = 0

    def _deal(self, order: np.ndarray, start: int) -> np.ndarray:
        remaining = order[start:]
        rounds, extra = divmod(len(remaining), self.num_replicas)
        if extra and not self.drop_last:
            rounds += 1
            # wrap around the epoch's order to fill the last round
            remaining = np.concatenate([remaining, np.resize(order, self.num_replicas - extra)])
        return remaining[:rounds * self.num_replicas][self.replica_rank::self.num_replicas]

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The epoch and position within it after ``consumed`` indices of the current iteration, to
        store in a checkpoint.

        ``consumed``: how many indices of the current iteration (a :meth:`stream` or one epoch)
        this replica has finished with; default all it yielded. Pass ``Prefetcher.delivered`` (or
        the samples the loop took) when a prefetcher draws indices ahead of the training loop,
        else the read-ahead indices would be skipped on resume. An epoch consumed to its end
        stays that epoch, at its end: resuming goes on with the next one.
        """
        if consumed is None:
            consumed = self._yielded
        if not 0 <= consumed <= self._yielded:
            raise ValueError(f"ReplicaSampler.state_dict: consumed={consumed}, but this iteration yielded "
                             f"{self._yielded} indices")
        epoch, position = self._position(consumed)
        return {"epoch": epoch, "consumed": position, "seed": self.seed, "shuffle": self.shuffle,
                "num_indices": len(self.indices), "indices_fingerprint": self._fingerprint,
                "num_replicas": self.num_replicas}

    def _position(self, consumed: int) -> tuple[int, int]:
        """(epoch, consumed count of all replicas) after this replica's first ``consumed`` indices."""
        for epoch, start, count in self._passes:
            if consumed <= count:
                return epoch, start + consumed * self.num_replicas
            consumed -= count
        return self._origin  # nothing yielded yet

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of that epoch's permutation.

        The number of replicas may differ from the run that saved it: the remaining
        indices of the permutation are dealt to the new replicas.
        """
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_indices", len(self.indices)),
                          ("indices_fingerprint", self._fingerprint)):
            if key not in state:
                raise KeyError(f"ReplicaSampler.load_state_dict: key {key!r} missing from the state")
            if state[key] != mine:
                raise ValueError(f"ReplicaSampler.load_state_dict: state has {key}={state[key]!r}, this sampler "
                                 f"{mine!r}; resuming would visit a different sequence of time indices")
        self._move_to(int(state["epoch"]), int(state["consumed"]))

    def _move_to(self, epoch: int, start: int) -> None:
        """The next iteration starts at ``start`` of ``epoch``; the state is that position until then."""
        self._epoch, self._start = epoch, start
        self._origin, self._passes, self._yielded = (epoch, start), [], 0
