"""Background prefetch of tile samples so that reading overlaps the training step.

``workers`` threads read samples ahead, at most ``depth`` in flight or waiting, while the
consumer computes; samples come out in the order of the indices whichever thread read
them. Threads are light (no processes to start, samples in the consumer's process) and
enough for small tiles; they stop scaling at about four busy cores (zarr's per-chunk
asyncio work holds the GIL): ~6.6 whole 0.25 deg samples/s on a 16-core GPU host, where
:class:`data.process_prefetch.ProcessPrefetcher` reaches ~17 (``benchmarks/READER.md``).
``depth`` bounds the samples held in memory (each ``(lead + 1) x tile x channels`` floats).

An error in the reader (or in drawing the next index) reaches the consumer as the
original exception, with a note naming the time index and the store, at the position in
the sequence where it happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from data.reader import Sample, TileReader


class ReadAhead(ABC):
    """What every prefetcher shares: the time indices in order (an error while drawing one
    reaches the consumer in its place), ``delivered`` and the context manager. Subclasses read
    (:meth:`_fill`) and :meth:`close`.

    The indices may be endless: the trainer passes one stream over all epochs
    (``ReplicaSampler.stream``), so the next epoch's first samples are read while the current
    epoch's last steps compute."""

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: int, depth: int,
                 workers: int, readers: str) -> None:
        name = type(self).__name__
        if depth < 1:
            raise ValueError(f"{name}: depth must be >= 1, got {depth}")
        if not 1 <= workers <= depth:
            raise ValueError(f"{name}: workers must lie in 1..depth={depth} (more {readers} than samples in "
                             f"flight would idle), got {workers}")
        self.reader = reader
        self.lead_steps = int(lead_steps)
        self.depth = depth
        self.delivered = 0
        self._indices = iter(time_indices)
        self._exhausted = False
        self._closed = False

    def _next_index(self) -> int | BaseException | None:
        """The next time index; None once they are exhausted; the error (with a note) when
        drawing one failed, which ends the sequence there."""
        if self._exhausted:
            return None
        try:
            return int(next(self._indices))
        except StopIteration:
            self._exhausted = True
            return None
        except BaseException as error:
            error.add_note(f"raised while drawing the next time index to prefetch from {self.reader.store}")
            self._exhausted = True
            return error

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
    """Iterates over ``reader.sample(t, lead_steps)`` for ``t`` in ``time_indices``, reading ahead.

    Yields the same samples in the same order as reading them in the loop would. Use it as
    a context manager (or call :meth:`close`): the threads stay until then. ``delivered`` counts
    the samples handed to the consumer, for ``ReplicaSampler.state_dict(consumed=...)``.
    """

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: int = 1, depth: int = 2,
                 workers: int = 1) -> None:
        super().__init__(reader, time_indices, lead_steps, depth, workers, readers="threads")
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
        while len(self._pending) < self.depth and (time_index := self._next_index()) is not None:
            if isinstance(time_index, BaseException):  # delivered in its place in the sequence
                failed: Future = Future()
                failed.set_exception(time_index)
                self._pending.append(failed)
                return
            self._pending.append(self._pool.submit(self._read, time_index))

    def _read(self, time_index: int) -> Sample:
        try:
            return self.reader.sample(time_index, self.lead_steps)
        except BaseException as error:
            error.add_note(f"raised while prefetching time index {time_index} (lead_steps={self.lead_steps}) "
                           f"from {self.reader.store}")
            raise
