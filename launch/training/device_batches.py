"""Micro-batches on the device one ahead of the step, their copies overlapped with compute.

A batch copied on the compute stream waits for the step before it and the next step waits
for the copy: at 0.25 deg one whole-grid sample is ~0.6 GB of float32 fields, ~20 ms of a
~80 ms ``jigsaw-1b`` step on one H100 (``benchmarks/GPU.md``). :class:`DeviceBatches` takes
the next micro-batch's samples from the prefetcher and enqueues their host-to-device copies
(and the normalisation, ``launch.runtime.rank_inputs.RankInputs.batch``) on a side stream *before* the
current micro-batch's step is launched, so the transfer runs while the device computes; the
compute stream waits only for that batch's own copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.prefetch import ReadAhead
from launch.runtime.rank_inputs import RankInputs

@dataclass(frozen=True)
class Batch:
    """One micro-batch of a rank's tiles on the device, and the time index of each sample."""

    state: torch.Tensor  # (batch, lat, lon, channels)
    static: torch.Tensor  # (lat, lon, static channels)
    forcings: torch.Tensor  # (batch, lead, lat, lon, forcing channels)
    targets: torch.Tensor  # (batch, lead, lat, lon, channels)
    time_indices: tuple[int, ...]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.state, self.static, self.forcings, self.targets


class DeviceBatches:
    """Iterates over micro-batches of ``micro_batch`` samples on ``device``, the next one staged
    ahead; it ends with the prefetcher's samples (a partial micro-batch is dropped). ``taken``:
    samples handed out (the count ``ReplicaSampler.state_dict(consumed=...)`` takes; the
    micro-batch staged ahead is not counted). A micro-batch's lead is its samples' own, so it may
    change from one micro-batch to the next (the trainer reads each step's rollout); the samples of
    one micro-batch must share it (``RankInputs.batch`` refuses a mix)."""

    def __init__(self, prefetcher: ReadAhead, inputs: RankInputs, micro_batch: int, device: torch.device | str,
                 dtype: torch.dtype):
        self.prefetcher, self.inputs, self.micro_batch = prefetcher, inputs, micro_batch
        self.device, self.dtype = torch.device(device), dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.taken = 0
        self._staged = self._stage()

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        staged = self._staged
        if staged is None:
            raise StopIteration
        self._staged = self._stage()  # the following copies go first: they overlap this batch's step
        batch, copied = staged
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            for tensor in batch.tensors():  # allocated on the side stream, used (and freed) on this one
                tensor.record_stream(current)
        self.taken += self.micro_batch
        return batch

    def _stage(self) -> tuple[Batch, torch.cuda.Event | None] | None:
        samples = []
        for _ in range(self.micro_batch):
            try:
                samples.append(next(self.prefetcher))
            except StopIteration:
                self.prefetcher.release(*samples)
                return None
        indices = tuple(sample.time_index for sample in samples)
        if self.stream is None:
            batch = Batch(*self.inputs.batch(samples, self.device, self.dtype), indices)
            self.prefetcher.release(*samples)
            return batch, None
        with torch.cuda.stream(self.stream):
            batch = Batch(*self.inputs.batch(samples, self.device, self.dtype), indices)
            self.prefetcher.release(*samples)  # slots reused once this stream has passed the copies
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return batch, copied
