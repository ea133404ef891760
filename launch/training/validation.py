"""Validation during training: one-step RMSE of every channel on a fixed set of validation times."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.sampler import valid_time_indices
from data.schema import HEADLINE_CHANNELS, StoreAttrs
from launch.runtime.rank_inputs import RankInputs
from weathermixer import metrics
from weathermixer.loss import WeightedMSE


def validation_indices(inputs: RankInputs, period: tuple[str, str] | None, samples: int) -> np.ndarray | None:
    """``samples`` time indices spread evenly over ``period`` (None: no validation)."""
    if period is None:
        return None
    reader = inputs.reader
    valid = valid_time_indices(reader.times, 1, *period, step=np.timedelta64(reader.step_hours, "h"))
    if len(valid) == 0:
        raise ValueError(f"data.validation = {list(period)}: no time in {reader.store} has a following state "
                         f"inside that period")
    n = min(len(valid), samples)
    return valid[np.linspace(0, len(valid) - 1, n).round().astype(int)]


class Validator:
    """Latitude-weighted RMSE in physical units (:func:`weathermixer.metrics.rmse`) and the loss (the NLL)."""

    def __init__(self, inputs: RankInputs, loss_fn: WeightedMSE, attrs: StoreAttrs, indices: np.ndarray):
        self.inputs, self.loss_fn, self.attrs, self.indices = inputs, loss_fn, attrs, indices

    @torch.no_grad()
    def __call__(self, model, dtype: torch.dtype) -> dict[str, Any]:
        """Scores of the model's mean weights (a Bayesian model's deterministic forecast); the
        next training step draws its weights again."""
        model.eval()
        model.use_mean_weights()
        mesh, device = model.mesh, self.loss_fn.lat_weights.device
        channels = model.state_channels.indices[mesh.tensor_rank]
        std = torch.tensor([self.attrs.std[i] for i in channels.tolist()], dtype=torch.float64, device=device)
        loss, errors = 0.0, []
        for index in self.indices:
            state, static, forcings, targets = self.inputs.batch([self.inputs.reader.sample(int(index), 1)], device,
                                                                 dtype)
            prediction = model(state, static, forcings[:, 0])
            loss += float(self.loss_fn(prediction, targets[:, 0]))
            errors.append(((prediction.double() - targets[:, 0].double()) * std)[0].movedim(-1, 0))
        model.train()
        local = metrics.rmse(torch.stack(errors), torch.zeros_like(torch.stack(errors)),
                             self.loss_fn.lat_weights.double().flatten(), time_dim=0, group=mesh.domain_group)
        rmse = torch.zeros(len(self.attrs.channels), dtype=torch.float64, device=device)
        rmse[channels.to(device)] = local
        if mesh.tensor_group is not None:  # every channel's value on every rank
            dist.all_reduce(rmse, group=mesh.tensor_group)
        names = self.attrs.channel_names
        out = {"validation_loss": loss / len(self.indices)}
        out.update({f"rmse_{name}": value for name, value in zip(names, rmse.tolist())
                    if name in HEADLINE_CHANNELS or len(names) <= 16})
        return out
