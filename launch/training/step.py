"""One training step of a WeatherMixer on its mesh, built from a run config.

:class:`TrainingStep` owns the model, the loss, the optimizer, its schedule and the DeepSpeed
engine, and runs one micro-batch forward, backward and engine step. The trainer and the
benchmarks both build it here, so a benchmark times exactly the step ``launch/train.py`` runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from data.schema import StoreAttrs
from launch.runtime.compile import compiled
from launch.training.config import RunConfig
from launch.training.engine import initialize_engine
from launch.training.master_weights import MasterWeightAdam
from launch.training.schedule import build_schedule
from parallel.mesh import ProcessMesh
from parallel.rng import seed_dropout
from weathermixer.config import ModelConfig
from weathermixer.loss import WeightedMSE, channel_weights, latitude_weights
from weathermixer.model import WeatherMixer


def loss_channel_weights(attrs: StoreAttrs, mode: str) -> torch.Tensor:
    """Per-channel loss weights of a store's channels: ``training.loss_weights`` = ``default``
    (by variable and pressure level, :func:`weathermixer.loss.channel_weights`) or ``uniform``."""
    if mode == "uniform":
        return torch.ones(len(attrs.channels), dtype=torch.float64)
    return channel_weights(attrs.channel_names, [c.variable for c in attrs.channels],
                           [c.level for c in attrs.channels])


def build_optimizer(model: WeatherMixer, run: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the model's own groups: torch's fused one, or with ``optimizer.master_weights``
    the one that keeps float32 master weights of bf16 parameters (it makes them bf16)."""
    o = run.optimizer
    groups = model.optimizer_groups(o.lr, o.embedding_lr, o.weight_decay)
    if o.master_weights:
        return MasterWeightAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, decoupled_weight_decay=True,
                                compile=run.training.compile)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)


def build_loss(model: WeatherMixer, latitudes: np.ndarray, channel_weights: torch.Tensor) -> WeightedMSE:
    """The weighted MSE of this rank's tile and channel slice: cell-area weights of the grid rows
    that exist in the data (``latitudes``, ascending; padded model rows weigh nothing) and this
    rank's slice of the per-channel weights."""
    config, mesh = model.config, model.mesh
    rows = torch.zeros(config.model_lat, dtype=torch.float64)
    stored = min(config.model_lat, len(latitudes))
    rows[:stored] = latitude_weights(np.asarray(latitudes)[:stored])
    (lat0, lat1), _ = model.layers.tile_bounds()
    local = model.state_channels.indices[mesh.tensor_rank].cpu()
    return WeightedMSE(rows[lat0:lat1], channel_weights[local], stored * config.model_lon,
                       float(channel_weights.sum()), mesh)


class TrainingStep:
    """Model, loss, optimizer, schedule and engine of a run; :meth:`micro_step` is one micro-batch."""

    def __init__(self, run: RunConfig, config: ModelConfig, mesh: ProcessMesh, device: torch.device,
                 latitudes: np.ndarray, channel_weights: torch.Tensor):
        self.run = run
        with torch.device(device):  # parameters are created and initialised where they will live
            model = WeatherMixer(config, mesh, seed=run.training.seed)
        seed_dropout(run.training.seed, mesh.data_rank, mesh.sample_rank, mesh.model_rank)
        optimizer = build_optimizer(model, run)
        schedule = build_schedule(optimizer, run.schedule, run.training.steps)
        self.engine, self.optimizer, self.scheduler = initialize_engine(model, optimizer, run.deepspeed_config(),
                                                                        mesh, lr_scheduler=schedule)
        self.model: WeatherMixer = self.engine.module
        self.loss_fn = build_loss(self.model, latitudes, channel_weights).to(device)
        from deepspeed.runtime.torch_autocast import autocast_if_enabled  # deepspeed imports after DS_ACCELERATOR

        self._autocast = functools.partial(autocast_if_enabled, self.engine)
        # one graph per rollout length and one for the loss; validation and export stay eager
        self._rollout = compiled(self.model.rollout) if run.training.compile else self.model.rollout
        self._loss = compiled(self.loss_fn) if run.training.compile else self.loss_fn
        master = run.optimizer.master_weights
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() or master else torch.float32

    def micro_step(self, batch, lead: int) -> torch.Tensor:
        """One micro-batch forward, backward and engine step; the loss stays on the device (no wait)."""
        state, static, forcings, targets = batch
        with self._autocast():  # DeepSpeed's torch_autocast, as engine.forward would apply it
            prediction = self._rollout(state, static, forcings[:, :lead], lead, self.run.training.rollout_mode)
        loss = self._loss(prediction, targets[:, :lead])
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()
