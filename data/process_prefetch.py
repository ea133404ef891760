"""Prefetch in reader processes, into shared (and page-locked) memory the consumer reads in place.

Reader threads of one process stop scaling at about four busy cores (asyncio and the GIL
between zarr's chunk tasks): 5.3 - 6.6 whole 0.25 deg samples/s on a 16-core GPU host, while
separate processes scale with the cores (``benchmarks/READER.md``). :class:`ProcessPrefetcher`
keeps ``depth`` slots of shared memory, each one sample's channel-first fields and time
features of the longest lead; ``workers`` spawned processes open the same
:class:`~data.reader.TileReader` and read each sample straight into the slot they are handed
(a shorter lead into the slot's first ``lead + 1`` time slices). The consumer gets samples whose
tensors are views of a slot: no copy, no pickling of sample data. When the reader pins
memory, the slots are registered page-locked with CUDA in this process, so the host-to-device
copies read them directly and asynchronously.

The contract is the one of :class:`data.prefetch.Prefetcher` (same samples, same order,
``delivered``, errors with a note naming the time index, indices that may span epochs without
end, context manager: :class:`data.prefetch.ReadAhead`), plus one rule:
a delivered sample's memory stays the consumer's until it calls :meth:`release` - after
enqueuing its device copies; on CUDA the slot is handed out again only once the current
stream has passed that point. At most ``depth`` samples are in flight, waiting or held.
"""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import queue
import signal
import traceback
from collections import deque
from collections.abc import Iterable

import torch
import torch.multiprocessing

from data.prefetch import Leads, Prefetcher, ReadAhead
from data.reader import Sample, TileReader

POLL_SECONDS = 1.0  # how often a waiting consumer (reader) checks that the readers (consumer) are alive
SHARED_MEMORY = "/dev/shm"


class ProcessPrefetcher(ReadAhead):
    """Iterates over ``reader.sample(t, lead)`` for ``t`` in ``time_indices`` (``lead``: ``lead_steps``
    or its value at ``t``'s position), read ahead by ``workers`` processes into ``depth`` shared
    slots of ``max_lead_steps``; call :meth:`release` on each sample once its memory is no longer
    needed."""

    def __init__(self, reader: TileReader, time_indices: Iterable[int], lead_steps: Leads = 1, depth: int = 2,
                 workers: int = 1, *, max_lead_steps: int | None = None) -> None:
        super().__init__(reader, time_indices, lead_steps, depth, workers, "processes", max_lead_steps)
        if reader.dtype != torch.float32:
            raise ValueError(f"ProcessPrefetcher: the reader's dtype must be float32 (samples are views of the "
                             f"float32 slots), got {reader.dtype}; cast on the device instead")
        shapes = reader.buffer_shapes(self.max_lead_steps)
        _check_shared_memory(depth * sum(4 * math.prod(shape) for shape in shapes), depth)
        self._slots = [tuple(torch.empty(shape).share_memory_() for shape in shapes) for _ in range(depth)]
        self._slot_of = {fields.untyped_storage().data_ptr(): slot for slot, (fields, _) in enumerate(self._slots)}
        self._registered: list[int] = []
        if reader.pin_memory:
            for tensor in (t for slot in self._slots for t in slot):
                _register_page_locked(tensor)
                self._registered.append(tensor.data_ptr())
        self._free = deque(range(depth))
        # (slot, time index, lead, error of drawing it) in sample order
        self._pending: deque[tuple[int | None, int | None, int | None, BaseException | None]] = deque()
        self._finished: dict[int, BaseException | None] = {}  # slot -> error of its read (None: read)
        self._held: set[int] = set()
        self._releasing: deque[tuple[int, torch.cuda.Event | None]] = deque()

        context = torch.multiprocessing.get_context("spawn")
        self._tasks = context.Queue()
        self._results = context.Queue()
        arguments = {**reader.arguments, "pin_memory": False}  # workers never touch CUDA
        self._workers = [context.Process(target=_read_samples, name=f"reader {k} of {reader.store}", daemon=True,
                                         args=(arguments, self._slots, self._tasks, self._results, os.getpid()))
                         for k in range(workers)]
        for worker in self._workers:
            worker.start()
        self._fill()

    @property
    def reading(self) -> bool:
        """Whether any reader process is still alive (False once closed)."""
        return any(worker.is_alive() for worker in self._workers)

    def __next__(self) -> Sample:
        if self._closed:
            raise StopIteration
        if not self._pending:
            self._reclaim(wait=True)
            self._fill()
            if not self._pending:
                if not self._exhausted:
                    self.close()
                    raise RuntimeError(f"ProcessPrefetcher: all {self.depth} slots hold delivered samples; call "
                                       f"release(sample) once a sample's memory is no longer needed (after its "
                                       f"device copy is enqueued), or raise depth")
                raise StopIteration  # the processes stay until close()
        slot, time_index, lead, error = self._pending[0]
        try:
            while error is None and slot not in self._finished:
                self._collect()
            if error is None:
                error = self._finished.pop(slot)
        except BaseException:
            self.close()
            raise
        self._pending.popleft()
        if error is not None:
            self.close()
            raise error
        self._held.add(slot)
        self.delivered += 1
        return self.reader.as_sample(leading_part(self._slots[slot], lead), time_index)

    def release(self, *samples: Sample) -> None:
        """Hand the memory of delivered ``samples`` back for reading ahead. On CUDA, call it after
        enqueuing the samples' copies: the slots are reused once the current stream passed here."""
        for sample in samples:
            slot = self._slot_of.get(sample.inputs.untyped_storage().data_ptr())
            if slot is None or slot not in self._held:
                raise ValueError(f"ProcessPrefetcher.release: time index {sample.time_index} is not a sample this "
                                 f"prefetcher delivered and still holds (released twice?)")
            self._held.remove(slot)
            event = None
            if self._registered:
                event = torch.cuda.Event()
                event.record()
            self._releasing.append((slot, event))
        if not self._closed:
            self._fill()

    def close(self) -> None:
        """Stop the reader processes (at most the samples being read are lost) and free the slots'
        page-locked registration. Samples already delivered stay readable."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        if self._registered:
            torch.cuda.synchronize()  # no copy may read a slot while it stops being page-locked
            for pointer in self._registered:
                torch.cuda.cudart().cudaHostUnregister(pointer)
            self._registered.clear()
        self._tasks.close()
        self._results.close()

    # ------------------------------------------------------------------ internals
    def _fill(self) -> None:
        """Hand every free slot the next time index."""
        self._reclaim(wait=False)
        while self._free and (read := self._next_read()) is not None:
            if isinstance(read, BaseException):  # delivered in its place in the sequence
                self._pending.append((None, None, None, read))
                return
            slot, (time_index, lead) = self._free.popleft(), read
            self._tasks.put((slot, time_index, lead))
            self._pending.append((slot, time_index, lead, None))

    def _reclaim(self, wait: bool) -> None:
        """Released slots whose device copies have completed become free (``wait``: the oldest one
        is waited for when no slot is free)."""
        while self._releasing:
            slot, event = self._releasing[0]
            if event is not None and not event.query():
                if not (wait and not self._free):
                    return
                event.synchronize()
            self._releasing.popleft()
            self._free.append(slot)

    def _collect(self) -> None:
        """Wait for one reader process's result."""
        while True:
            try:
                slot, time_index, lead, error = self._results.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                ended = [worker for worker in self._workers if not worker.is_alive()]
                if ended:
                    raise RuntimeError(f"ProcessPrefetcher: reader process {ended[0].name!r} (pid {ended[0].pid}) "
                                       f"ended with exit code {ended[0].exitcode} while samples were pending "
                                       f"(killed for memory? each holds one TileReader)")
        if slot is None:
            error.add_note(f"raised while a reader process opened {self.reader.store}")
            raise error
        if error is not None:
            error.add_note(f"raised while prefetching time index {time_index} (lead_steps={lead}) from "
                           f"{self.reader.store} in a reader process")
        self._finished[slot] = error


# the prefetcher of each ``data.worker_kind``
PREFETCHERS: dict[str, type[ReadAhead]] = {"thread": Prefetcher, "process": ProcessPrefetcher}


def _register_page_locked(tensor: torch.Tensor) -> None:
    """Register ``tensor``'s memory with CUDA as page-locked (for asynchronous copies)."""
    code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(code) != 0:
        raise RuntimeError(f"ProcessPrefetcher: cudaHostRegister of a {tensor.numel() * 4 / 2**20:.0f} MiB slot "
                           f"failed with CUDA error {int(code)}; lower depth or pass a reader without pin_memory")


def _check_shared_memory(n_bytes: int, depth: int) -> None:
    """Refuse slots that do not fit the shared-memory file system (containers often mount 64 MiB)."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return  # no /dev/shm to check (not Linux): torch reports any failure itself
    available = stats.f_bavail * stats.f_frsize
    if n_bytes > available:
        raise ValueError(f"ProcessPrefetcher: {depth} slots need {n_bytes / 2**30:.2f} GiB of shared memory, "
                         f"{SHARED_MEMORY} has {available / 2**30:.2f} GiB free; lower data.prefetch (depth) or "
                         f"mount a larger {SHARED_MEMORY} (e.g. docker run --shm-size)")


def leading_part(slot: tuple[torch.Tensor, torch.Tensor], lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory of a ``lead``-step sample in a slot of a longer lead: the first ``lead + 1`` time
    slices of its fields and forcings (contiguous views, as ``TileReader.sample(out=...)`` needs)."""
    return tuple(tensor[:lead + 1] for tensor in slot)


def _read_samples(arguments: dict, slots: list, tasks, results, parent: int) -> None:
    """A reader process: open the reader, then read each ``(slot, time_index, lead)`` task into its
    slot's leading part. Ctrl-C is the consumer's to handle (it closes the readers); a reader whose
    consumer died ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _keep_freed_memory()
    try:
        reader = TileReader(**arguments)
    except BaseException as error:  # reported, then this process ends
        results.put((None, None, None, _portable(error)))
        return
    while True:
        try:
            task = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        slot, time_index, lead = task
        try:
            reader.sample(time_index, lead, out=leading_part(slots[slot], lead))
            results.put((slot, time_index, lead, None))
        except BaseException as error:
            results.put((slot, time_index, lead, _portable(error)))


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed chunk-sized blocks for the next chunk.

    zarr allocates every chunk's file bytes and decoded array anew (4 MiB each at 0.25 deg);
    by default glibc hands such blocks back to the kernel on free (mmap / heap trimming), so
    every chunk faults its pages in again. Blocks up to the largest mmap threshold (32 MiB) now
    come from the heap, which is not trimmed below 1 GiB (one reader process on the 2-core dev
    VM: 3x fewer page faults, ~8-10 % more samples/s, ``benchmarks/GPU.md``).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 2**30)


def _portable(error: BaseException) -> BaseException:
    """``error`` with its traceback as a note, or a RuntimeError naming it if it does not pickle."""
    text = "".join(traceback.format_exception(error)).rstrip()
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    error.add_note(f"reader process traceback:\n{text}")
    return error
