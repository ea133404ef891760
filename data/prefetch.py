"""Background prefetch of tile samples so that reading overlaps the training step.

A daemon thread reads samples ahead into a bounded queue while the consumer computes.
A thread suffices: the reading is file I/O and zarr decompression, which release the GIL,
and it keeps the samples in the consumer's process with no pickling. ``depth`` bounds
the samples held in memory (each ``(lead + 1) x tile x channels`` floats).

An error in the reader (or in drawing the next index) reaches the consumer as the
original exception, with a note naming the time index and the store, at the position in
the sequence where it happened.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from data.reader import Sample, TileReader

_POLL_SECONDS = 0.1


class _Finished:
    """Queue item marking the end of the indices."""


class _Failed:
    """Queue item carrying an exception raised in the prefetch thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterates over ``reader.sample(t, lead_steps)`` for ``t`` in ``time_indices``, reading ahead.

    Yields the same samples in the same order as reading them in the loop would. Use it as
    a context manager (or call :meth:`close`) when leaving the loop early; running to the
    end closes it too. ``delivered`` counts the samples handed to the consumer, for
    ``ReplicaSampler.state_dict(consumed=...)``.
    """

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: int = 1, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be >= 1, got {depth}")
        self.reader = reader
        self.lead_steps = lead_steps
        self.delivered = 0
        self._indices = time_indices
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._fill, name=f"prefetch {reader.store}", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Finished):
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        self.delivered += 1
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (at most the sample being read)."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fill(self) -> None:
        indices = iter(self._indices)
        while not self._stop.is_set():
            try:
                time_index = next(indices)
            except StopIteration:
                self._put(_Finished())
                return
            except BaseException as error:  # the consumer must not wait forever
                error.add_note(f"raised while drawing the next time index to prefetch from {self.reader.store}")
                self._put(_Failed(error))
                return
            try:
                sample = self.reader.sample(time_index, self.lead_steps)
            except BaseException as error:
                error.add_note(f"raised while prefetching time index {time_index} (lead_steps={self.lead_steps}) "
                               f"from {self.reader.store}")
                self._put(_Failed(error))
                return
            self._put(sample)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue
