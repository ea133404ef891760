"""Background prefetch of tile samples so that reading overlaps the training step.

``workers`` threads read samples ahead, at most ``depth`` in flight or waiting, while the
consumer computes; samples come out in the order of the indices whichever thread read
them. Threads are light (no processes to start, samples in the consumer's process) and
enough for small tiles; they stop scaling at about four busy cores (zarr's per-chunk
asyncio work holds the GIL): ~6.6 whole 0.25 deg samples/s on a 16-core GPU host, where
:class:`data.process_prefetch.ProcessPrefetcher` reaches ~17 (``benchmarks/READER.md``).
``depth`` bounds the samples held in memory (each ``(lead + 1) x tile x channels`` floats).

The lead (targets per sample) is one int, or a function of the sample's position in the
sequence: the trainer reads each sample with the rollout of the step it is used in
(``launch.training.loop.sample_leads``), so a phase of short rollouts reads no targets that only
the longest rollout of the schedule needs.

An error in the reader (or in drawing the next index) reaches the consumer as the
original exception, with a note naming the time index and the store, at the position in
the sequence where it happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from data.reader import Sample, TileReader


Leads = int | Callable[[int], int]  # one lead, or the lead of the sample at each position (0, 1, ...)


def _lead_function(name: str, lead_steps: Leads, max_lead_steps: int | None) -> tuple[Callable[[int], int], int]:
    """``lead_steps`` as a function of the position, and the longest lead it may give."""
    if callable(lead_steps):
        if max_lead_steps is None or max_lead_steps < 0:
            raise ValueError(f"{name}: a lead per position (lead_steps={lead_steps!r}) needs max_lead_steps >= 0, "
                             f"the longest lead it gives, got {max_lead_steps}")
        return lead_steps, int(max_lead_steps)
    lead = int(lead_steps)
    longest = lead if max_lead_steps is None else int(max_lead_steps)
    if not 0 <= lead <= longest:
        raise ValueError(f"{name}: lead_steps must lie in 0..max_lead_steps={longest}, got {lead}")
    return (lambda position: lead), longest


class ReadAhead(ABC):
    """What every prefetcher shares: the time indices in order with each one's lead (an error
    while drawing either reaches the consumer in its place), ``delivered`` and the context manager.
    Subclasses read (:meth:`_fill`) and :meth:`close`.

    ``lead_steps``: the targets of every sample, or a function of the sample's position in the
    sequence (0 for the first index drawn) giving its lead; ``max_lead_steps`` bounds the leads
    (required with a function: the memory a sample may need).

    The indices may be endless: the trainer passes one stream over all epochs
    (``ReplicaSampler.stream``), so the next epoch's first samples are read while the current
    epoch's last steps compute."""

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: Leads, depth: int,
                 workers: int, readers: str, max_lead_steps: int | None) -> None:
        name = type(self).__name__
        if depth < 1:
            raise ValueError(f"{name}: depth must be >= 1, got {depth}")
        if not 1 <= workers <= depth:
            raise ValueError(f"{name}: workers must lie in 1..depth={depth} (more {readers} than samples in "
                             f"flight would idle), got {workers}")
        self.reader = reader
        self._lead_of, self.max_lead_steps = _lead_function(name, lead_steps, max_lead_steps)
        self.depth = depth
        self.delivered = 0
        self._indices = iter(time_indices)
        self._drawn = 0  # the position of the next time index in the sequence
        self._exhausted = False
        self._closed = False

    def _next_read(self) -> tuple[int, int] | BaseException | None:
        """The next ``(time index, lead)``; None once the indices are exhausted; the error (with a
        note) when drawing one or its lead failed, which ends the sequence there."""
        if self._exhausted:
            return None
        try:
            time_index = int(next(self._indices))
        except StopIteration:
            self._exhausted = True
            return None
        except BaseException as error:
            error.add_note(f"raised while drawing the next time index to prefetch from {self.reader.store}")
            self._exhausted = True
            return error
        try:
            lead = self._lead(time_index)
        except BaseException as error:
            self._exhausted = True
            return error
        self._drawn += 1
        return time_index, lead

    def _lead(self, time_index: int) -> int:
        """The lead of the time index at the current position, checked against ``max_lead_steps``."""
        try:
            lead = int(self._lead_of(self._drawn))
        except BaseException as error:
            error.add_note(f"raised while computing the lead of sample {self._drawn} (time index {time_index}) "
                           f"to prefetch from {self.reader.store}")
            raise
        if not 0 <= lead <= self.max_lead_steps:
            raise ValueError(f"{type(self).__name__}: the lead of sample {self._drawn} (time index {time_index}) is "
                             f"{lead}, expected 0..max_lead_steps={self.max_lead_steps}")
        return lead

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Stop the readers."""

    @abstractmethod
    def _fill(self) -> None:
        """Start reading the next time indices as far as the readers' room allows."""


class Prefetcher(ReadAhead):
    """Iterates over ``reader.sample(t, lead)`` for ``t`` in ``time_indices`` (``lead``: ``lead_steps``
    or its value at ``t``'s position), reading ahead.

    Yields the same samples in the same order as reading them in the loop would. Use it as
    a context manager (or call :meth:`close`): the threads stay until then. ``delivered`` counts
    the samples handed to the consumer, for ``ReplicaSampler.state_dict(consumed=...)``.
    """

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: Leads = 1, depth: int = 2,
                 workers: int = 1, *, max_lead_steps: int | None = None) -> None:
        super().__init__(reader, time_indices, lead_steps, depth, workers, "threads", max_lead_steps)
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"prefetch {reader.store}")
        self._fill()

    @property
    def reading(self) -> bool:
        """Whether any reader thread is still alive (False once closed)."""
        return any(thread.is_alive() for thread in self._pool._threads)

    def __next__(self) -> Sample:
        if self._closed or not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        try:
            sample = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        self.delivered += 1
        return sample

    def release(self, *samples: Sample) -> None:
        """Nothing to do: each sample owns its memory (the interface of
        :class:`data.process_prefetch.ProcessPrefetcher`, whose samples share slots)."""

    def close(self) -> None:
        """Stop reading ahead and wait for the threads (at most the samples being read)."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _drop_read_ahead(self) -> None:
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            if not future.cancelled():
                future.exception()  # wait for it; a dropped read's error is dropped with it
        self._pending.clear()

    def _fill(self) -> None:
        """Keep ``depth`` samples in flight or waiting."""
        while len(self._pending) < self.depth and (read := self._next_read()) is not None:
            if isinstance(read, BaseException):  # delivered in its place in the sequence
                failed: Future = Future()
                failed.set_exception(read)
                self._pending.append(failed)
                return
            self._pending.append(self._pool.submit(self._read, *read))

    def _read(self, time_index: int, lead: int) -> Sample:
        try:
            return self.reader.sample(time_index, lead)
        except BaseException as error:
            error.add_note(f"raised while prefetching time index {time_index} (lead_steps={lead}) "
                           f"from {self.reader.store}")
            raise
