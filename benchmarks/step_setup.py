"""The trainer's own training step, set up for a benchmark from a few flags.

The run config is assembled from the flags (preset, micro-batch, ZeRO stage, precision,
compile) and :class:`launch.training.step.TrainingStep` builds model, loss, optimizer and
engine from it exactly as ``launch/train.py`` does; batches come from random tensors resident
on the device or from the zarr tile reader through the trainer's prefetchers and
:class:`launch.training.device_batches.DeviceBatches`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from data.schema import SURFACE, UPPER_AIR
from launch.runtime.rank_inputs import RankInputs
from launch.training.config import RunConfig, load_run_config
from launch.training.device_batches import Batch
from launch.training.step import TrainingStep
from parallel.mesh import ProcessMesh
from weathermixer.loss import channel_weights

ERA5_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
# --precision: the DeepSpeed JSON and overrides of each
PRECISIONS = {
    "bf16": lambda zero: (f"configs/deepspeed/zero{zero}.json", {}),  # DeepSpeed bf16, its fp32 master copy
    "autocast": lambda zero: (f"configs/deepspeed/zero{zero}.json",  # fp32 weights, bf16 matmuls
                              {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
    "master": lambda zero: ("configs/deepspeed/fp32.json", {}),  # bf16 weights, fp32 masters in the optimizer
    "fp32": lambda zero: (f"configs/deepspeed/zero{zero}.json", {"bf16": {"enabled": False}}),  # CPU runs
}


def benchmark_run(preset_name: str, batch: int, zero: int, precision: str, compiled: bool, device: str,
                  store: str | None = None, readers: int = 4, reader_kind: str = "thread",
                  checkpointing: bool = False, dropout: float | None = None, bayesian: str = "none",
                  samples: int = 1, sample_ranks: int = 1, fp8: str = "none",
                  fp8_groups: list[str] | None = None, fp8_backward_groups: list[str] | None = None) -> RunConfig:
    """The run config of one benchmark case (validated like any run's)."""
    deepspeed, overrides = PRECISIONS[precision](zero)
    model_overrides = {"activation_checkpointing": checkpointing, "bayesian": bayesian, "fp8": fp8}
    if dropout is not None:
        model_overrides["dropout"] = dropout
    if fp8_groups is not None:
        model_overrides["fp8_groups"] = fp8_groups
    if fp8_backward_groups is not None:
        model_overrides["fp8_backward_groups"] = fp8_backward_groups
    return load_run_config(values={
        "model": {"preset": preset_name, "overrides": model_overrides},
        "data": {"store": store or "<random batches in device memory>", "train": ["1900-01-01", "2200-01-01"],
                 "workers": readers, "prefetch": 2 * readers + batch, "worker_kind": reader_kind},
        "training": {"steps": 10**9, "micro_batch": batch, "compile": compiled, "device": device, "samples": samples},
        "mesh": {"sample": sample_ranks},
        "optimizer": {"master_weights": precision == "master", "weight_decay": 0.01},
        "schedule": {"warmup_steps": 0, "decay": "constant"},
        "deepspeed": deepspeed, "deepspeed_overrides": overrides})


def era5_channel_weights(n_channels: int) -> torch.Tensor:
    """ERA5's channel weights when the model has ERA5's 69 channels, else uniform ones."""
    variables = list(SURFACE) + [v for v in UPPER_AIR for _ in ERA5_LEVELS]
    levels = [None] * len(SURFACE) + [lev for _ in UPPER_AIR for lev in ERA5_LEVELS]
    if n_channels != len(variables):
        return torch.ones(n_channels, dtype=torch.float64)
    names = [v if lev is None else f"{v}{lev}" for v, lev in zip(variables, levels)]
    return channel_weights(names, variables, levels)


def build_step(run: RunConfig, mesh: ProcessMesh, device: torch.device) -> TrainingStep:
    """The trainer's step for ``run``: on the store's grid and channels, or the preset's for random batches."""
    if not run.data.store.startswith("<"):
        return TrainingStep.for_store(run, mesh, device)
    config = run.model.build()
    return TrainingStep(run, config, mesh, device, np.linspace(-90.0, 90.0, config.lat),
                        era5_channel_weights(config.out_channels))


class MemoryBatches:
    """A few distinct random batches of the model's tile, resident on the device, handed out in turn."""

    def __init__(self, step: TrainingStep, count: int = 3, seed: int = 0):
        model, batch = step.model, step.run.training.micro_batch
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        rank, config = model.mesh.tensor_rank, model.config
        lat, lon = model.tile_shape

        def draw(*shape):
            return torch.randn(*shape, device=device, generator=generator).to(step.dtype)

        def local(n):
            return len(model.layers.channels(n).indices[rank])

        self.batches = [Batch(draw(batch, lat, lon, local(config.in_channels)),
                              draw(lat, lon, local(config.static_channels)),
                              draw(batch, 1, lat, lon, local(config.forcing_channels)),
                              draw(batch, 1, lat, lon, local(config.out_channels)), tuple(range(batch)))
                        for _ in range(count)]
        self.taken = 0

    def next(self):
        self.taken += 1
        return self.batches[self.taken % len(self.batches)]

    def close(self) -> None:
        self.batches.clear()


class ZarrBatches:
    """Batches as the trainer gets them: the rank's tile read ahead by the run's prefetcher and
    moved to the device one micro-batch ahead (:class:`DeviceBatches`); ``wait_ms`` holds the
    host's wait for each batch."""

    def __init__(self, step: TrainingStep, seed: int = 0):
        from data.process_prefetch import PREFETCHERS
        from data.sampler import ReplicaSampler, valid_time_indices
        from launch.training.device_batches import DeviceBatches

        run, device = step.run, next(step.model.parameters()).device
        inputs = RankInputs(run.data.store, step.model, pin_memory=device.type == "cuda")
        sampler = ReplicaSampler(valid_time_indices(inputs.reader.times, 1), replica_rank=0, num_replicas=1, seed=seed)
        time_indices = sampler.stream(samples_per_step=run.training.micro_batch)  # epoch after epoch, as the trainer
        self.prefetcher = PREFETCHERS[run.data.worker_kind](inputs.reader, time_indices, 1, run.data.prefetch,
                                                            run.data.workers)
        self.batches = DeviceBatches(self.prefetcher, inputs, run.training.micro_batch, device, step.dtype)
        self.wait_ms: list[float] = []

    def next(self):
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_ms.append((time.perf_counter() - t0) * 1e3)
        return batch

    def close(self) -> None:
        self.prefetcher.close()


def batch_source(step: TrainingStep, seed: int = 0):
    return MemoryBatches(step, seed=seed) if step.run.data.store.startswith("<") else ZarrBatches(step, seed)

