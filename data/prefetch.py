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

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from data.reader import Sample, TileReader


class Prefetcher:
    """Iterates over ``reader.sample(t, lead_steps)`` for ``t`` in ``time_indices``, reading ahead.

    Yields the same samples in the same order as reading them in the loop would. Use it as
    a context manager (or call :meth:`close`): the threads stay for :meth:`reset` (the next
    epoch) until then. ``delivered`` counts the samples handed to the consumer, for
    ``ReplicaSampler.state_dict(consumed=...)``.
    """

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: int = 1, depth: int = 2,
                 workers: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1, got {depth}")
        if not 1 <= workers <= depth:
            raise ValueError(f"Prefetcher: workers must lie in 1..depth={depth} (more threads than samples in "
                             f"flight would idle), got {workers}")
        self.reader = reader
        self.lead_steps = lead_steps
        self.depth = depth
        self.delivered = 0
        self._indices = iter(time_indices)
        self._exhausted = False
        self._done = False
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"prefetch {reader.store}")
        self._fill()

    @property
    def reading(self) -> bool:
        """Whether any reader thread is still alive (False once closed)."""
        return any(thread.is_alive() for thread in self._pool._threads)

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        if self._done or not self._pending:
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

    def reset(self, time_indices: Iterable[int]) -> None:
        """Go on with ``time_indices`` (e.g. the next epoch) on the same threads: samples read
        ahead and not delivered are dropped, ``delivered`` starts again at 0."""
        if self._done:
            raise RuntimeError("Prefetcher.reset: the prefetcher is closed")
        for future in self._pending:
            future.cancel()
        for future in self._pending:
            if not future.cancelled():
                future.exception()  # wait for it; a dropped read's error is dropped with it
        self._pending.clear()
        self._indices = iter(time_indices)
        self._exhausted = False
        self.delivered = 0
        self._fill()

    def release(self, *samples: Sample) -> None:
        """Nothing to do: each sample owns its memory (the interface of
        :class:`data.process_prefetch.ProcessPrefetcher`, whose samples share slots)."""

    def close(self) -> None:
        """Stop reading ahead and wait for the threads (at most the samples being read)."""
        self._done = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fill(self) -> None:
        """Keep ``depth`` samples in flight or waiting."""
        while not self._exhausted and len(self._pending) < self.depth:
            try:
                time_index = next(self._indices)
            except StopIteration:
                self._exhausted = True
                return
            except BaseException as error:  # delivered in its place in the sequence
                error.add_note(f"raised while drawing the next time index to prefetch from {self.reader.store}")
                failed: Future = Future()
                failed.set_exception(error)
                self._pending.append(failed)
                self._exhausted = True
                return
            self._pending.append(self._pool.submit(self._read, time_index))

    def _read(self, time_index: int) -> Sample:
        try:
            return self.reader.sample(time_index, self.lead_steps)
        except BaseException as error:
            error.add_note(f"raised while prefetching time index {time_index} (lead_steps={self.lead_steps}) "
                           f"from {self.reader.store}")
            raise
