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
from launch.runtime.rank_inputs import config_for_store, noise_channel_scale, store_attrs, store_latitudes
from launch.training.config import RunConfig
from launch.training.device_batches import Batch
from launch.training.engine import initialize_engine
from launch.training.master_weights import MasterWeightAdam
from launch.training.schedule import build_schedule
from parallel.fp8 import advance_histories, check_fp8_device, delayed_products
from parallel.mesh import ProcessMesh
from parallel.rng import seed_dropout
from weathermixer.config import ModelConfig
from weathermixer.input_noise import InputNoise
from weathermixer.loss import WeightedCRPS, WeightedMSE, channel_weights, latitude_weights
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


def build_loss(model: WeatherMixer, latitudes: np.ndarray, channel_weights: torch.Tensor,
               crps_alpha: float | None = None) -> WeightedMSE | WeightedCRPS:
    """The weighted MSE (or, with ``crps_alpha``, the almost fair CRPS across the members on the
    sample ranks) of this rank's tile and channel slice: cell-area weights of the grid rows that
    exist in the data (``latitudes``, ascending; padded model rows weigh nothing) and this rank's
    slice of the per-channel weights."""
    config, mesh = model.config, model.mesh
    rows = torch.zeros(config.model_lat, dtype=torch.float64)
    stored = min(config.model_lat, len(latitudes))
    rows[:stored] = latitude_weights(np.asarray(latitudes)[:stored])
    (lat0, lat1), _ = model.layers.tile_bounds()
    local = model.state_channels.indices[mesh.tensor_rank].cpu()
    arguments = (rows[lat0:lat1], channel_weights[local], stored * config.model_lon, float(channel_weights.sum()), mesh)
    return WeightedMSE(*arguments) if crps_alpha is None else WeightedCRPS(*arguments, alpha=crps_alpha)


class TrainingStep:
    """Model, loss, optimizer, schedule and engine of a run; :meth:`micro_step` is one micro-batch.

    The loss is the ELBO of the sampling axis: the mean over this rank's Monte Carlo samples of
    the weighted MSE (a Gaussian NLL per value up to constants), or with ``training.loss = crps``
    the almost fair CRPS of all samples as ensemble members, plus ``kl_weight * KL / (N D)`` for
    a Bayesian model (:meth:`set_training_size`). Sample rank ``r`` runs the global samples
    ``r * S_r .. (r + 1) * S_r - 1`` (``S_r = training.samples / mesh.sample``), each with its own
    weight draw and input noise keyed by (seed, step, sample); DeepSpeed averages the gradients
    over data x sample, so ``S`` samples on one rank give the gradient of ``S / k`` samples on
    each of ``k`` ranks.
    """

    def __init__(self, run: RunConfig, config: ModelConfig, mesh: ProcessMesh, device: torch.device,
                 latitudes: np.ndarray, channel_weights: torch.Tensor, noise_scale: np.ndarray | None = None):
        self.run, self.mesh = run, mesh
        if config.fp8 != "none":
            check_fp8_device(device)
        with torch.device(device):  # parameters are created and initialised where they will live
            model = WeatherMixer(config, mesh, seed=run.training.seed)
        seed_dropout(run.training.seed, mesh.data_rank, mesh.sample_rank, mesh.model_rank)
        optimizer = build_optimizer(model, run)
        self.base_optimizer = optimizer  # the torch optimizer (DeepSpeed's ZeRO and bf16 ones wrap it)
        schedule = build_schedule(optimizer, run.schedule, run.training.steps)
        self.engine, self.optimizer, self.scheduler = initialize_engine(model, optimizer, run.deepspeed_config(),
                                                                        mesh, lr_scheduler=schedule)
        self.model: WeatherMixer = self.engine.module
        self.loss_fn = build_loss(self.model, latitudes, channel_weights).to(device)  # also validation's
        t = run.training
        self.crps_fn = build_loss(self.model, latitudes, channel_weights, crps_alpha=t.crps_alpha).to(device) \
            if t.loss == "crps" else None
        self.samples_per_rank = run.training.samples // mesh.config.sample
        self.set_training_size(1)
        self.augment = InputNoise(self.model, run.training.seed, run.training.input_noise, len(latitudes),
                                  noise_scale)
        from deepspeed.runtime.torch_autocast import autocast_if_enabled  # deepspeed imports after DS_ACCELERATOR

        self._autocast = functools.partial(autocast_if_enabled, self.engine)
        # one graph per rollout length (and with or without the KL) and one for the loss;
        # validation and export stay eager
        self._forward = compiled(self._sample_forward) if run.training.compile else self._sample_forward
        loss_fn = self.crps_fn or self.loss_fn
        self._loss = compiled(loss_fn) if run.training.compile else loss_fn
        master = run.optimizer.master_weights
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() or master else torch.float32
        self._channels = self.model.state_channels.indices[mesh.tensor_rank].to(device)  # inputs, targets, outputs
        self.nonfinite: torch.Tensor | None = None
        self.fp8_products = delayed_products(self.model)  # their amax histories advance after each backward

    @classmethod
    def for_store(cls, run: RunConfig, mesh: ProcessMesh, device: torch.device) -> "TrainingStep":
        """The step of ``run`` on its store's grid and channels."""
        store = run.data.store
        attrs, _, _ = store_attrs(store)
        return cls(run, config_for_store(run.model.build(), store), mesh, device, store_latitudes(store),
                   loss_channel_weights(attrs, run.training.loss_weights),
                   noise_channel_scale(attrs, run.training.input_noise_scale, store))

    def set_training_size(self, n_train: int) -> None:
        """The number of training samples N of the ELBO.

        The weighted MSE is the mean over the D values of a sample (grid points x channels) of a
        Gaussian NLL with variance 1/2 in normalised units, up to a constant; the ELBO per value is
        then ``MSE + KL / (N * D)``, and ``kl_weight`` (beta) scales the KL term."""
        config = self.model.config
        values = self.loss_fn.grid_points * config.out_channels
        self.kl_scale = self.run.training.kl_weight / (max(1, n_train) * values)

    def micro_step(self, batch: Batch, lead: int, step: int) -> torch.Tensor:
        """One micro-batch forward, backward and engine step at training step ``step``;
        ``(loss, nll, kl)`` stay on the device (no wait)."""
        losses = self.forward_backward(batch, lead, step)
        self.engine.step()
        return losses

    def _sample_forward(self, state: torch.Tensor, static: torch.Tensor, forcings: torch.Tensor,
                        lead: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's rollout and the model's KL divergence. The sample's weights are drawn
        once for the rollout, the KL in the same pass (``WeatherMixer.draw_sample``); the backward
        of the draw and the KL is then one closed-form expression per block, compiled into one
        fused pass. The weights stay held until the step's backward is done: a checkpointed
        block recomputes its forward there with them."""
        kl = self.model.draw_sample()
        return self.model.rollout(state, static, forcings, lead, self.run.training.rollout_mode), kl

    def forward_backward(self, batch: Batch, lead: int, step: int) -> torch.Tensor:
        """The loss of this rank's samples and its backward (gradients averaged over the replicas).

        ``nonfinite`` then holds, on the device, the first global channel whose inputs, targets and
        predictions hold a NaN or Inf (:data:`FINITE` where none does): what a non-finite loss is
        traced to."""
        if batch.targets.shape[1] < lead:
            raise ValueError(f"TrainingStep: step {step} rolls out {lead} steps, but its batch (time indices "
                             f"{batch.time_indices}) holds {batch.targets.shape[1]} targets per sample")
        predictions, kl = [], None
        for k in range(self.samples_per_rank):
            sample = self.mesh.sample_rank * self.samples_per_rank + k
            self.model.draw_weights(step, sample)
            state = self.augment(batch.state, batch.time_indices, step, sample)
            with self._autocast():  # DeepSpeed's torch_autocast, as engine.forward would apply it
                prediction, sample_kl = self._forward(state, batch.static, batch.forcings[:, :lead], lead)
            predictions.append(prediction)
            kl = sample_kl if k == 0 else kl
        targets = batch.targets[:, :lead]
        self.nonfinite = torch.stack([nonfinite_channel(batch.state, self._channels),
                                      nonfinite_channel(targets, self._channels),
                                      torch.stack([nonfinite_channel(p, self._channels) for p in predictions]).min()])
        if self.crps_fn is None:  # the mean over this rank's samples of each one's NLL
            data_loss = sum(self._loss(prediction, targets) for prediction in predictions) / len(predictions)
            scale = 1.0
        else:  # one score of all members; DeepSpeed's mean over the sample ranks would divide its gradient
            data_loss = self._loss(torch.stack(predictions), targets)
            scale = float(self.mesh.config.sample)
        loss = data_loss + self.kl_scale * kl
        # the KL is the same on every rank: its gradient needs no compensation for the mean
        self.engine.backward(loss if scale == 1 else data_loss * scale + self.kl_scale * kl)
        self.model.release_sample()
        advance_histories(self.fp8_products)  # after backward: a checkpointed block's recomputation is in this step
        return torch.stack([loss, data_loss, kl]).detach()


FINITE = 2**31  # nonfinite_channel's answer where every channel is finite


def nonfinite_channel(values: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """The smallest of ``channels`` (global indices of the last dimension) whose values hold a NaN
    or Inf, else :data:`FINITE`; a device scalar (nothing waits for the host).

    A channel's extremes are non-finite exactly when one of its values is (the minimum and the
    maximum carry a NaN, -Inf and +Inf): one reading pass, where ``isfinite(values).all()`` makes
    four passes over a full-size temporary each step."""
    extremes = torch.aminmax(values.flatten(0, -2), dim=0)
    finite = torch.isfinite(extremes.min) & torch.isfinite(extremes.max)
    return torch.where(finite, FINITE, channels).min()
