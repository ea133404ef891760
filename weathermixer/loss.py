"""Training loss: latitude- and channel-weighted MSE on normalised fields, exact on any mesh.

    loss = sum_{b,i,j,c} w_lat[i] * w_ch[c] * (pred - target)^2 / (B * n_lat * n_lon * sum_c w_ch[c])

``w_lat`` are cell-area weights (cos latitude) normalised to mean 1 over the model grid, so
a uniform error gives the same loss with and without them. ``w_ch`` are per-channel weights
(the paper weights ERA5 channels; :func:`channel_weights` gives those defaults).

On a mesh each rank holds a tile of points and a slice of channels: it sums its own
squared errors (in float32 or wider, whatever the activation dtype) and the sum is reduced
over the model group, so every rank gets the serial loss and the serial gradient of its
own block. The reduced value is the same scalar on every rank, so its gradient with respect
to a rank's partial sum is 1 (not the sum over ranks that ``all_reduce_sum``'s backward
gives for activations that feed different outputs): the sum of the other ranks' parts
enters as a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from parallel.comm import all_reduce_sum
from parallel.mesh import ProcessMesh

# Relative weights of ERA5 variables in the loss (surface and upper-air); within a
# variable, upper-air levels are weighted by pressure (lower atmosphere counts more),
# as GraphCast and the Jigsaw paper's training code do.
VARIABLE_WEIGHTS = {"msl": 1.0, "u10": 0.1, "v10": 0.1, "t2m": 1.0,
                    "z": 1.0, "t": 1.0, "u": 1.0, "v": 1.0, "q": 1.0}


def latitude_weights(latitudes: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``cos(latitude)`` normalised to mean 1 over ``latitudes`` (degrees), float64.

    Pole rows get a small positive weight (a quarter cell) instead of zero, so that a
    model is still told about them.
    """
    latitudes = torch.as_tensor(latitudes, dtype=torch.float64)
    if latitudes.dim() != 1 or latitudes.numel() == 0:
        raise ValueError(f"latitude_weights: expected a non-empty 1-D array of degrees, got shape "
                         f"{tuple(latitudes.shape)}")
    if (latitudes.abs() > 90).any():
        raise ValueError(f"latitude_weights: latitudes must lie in [-90, 90], got {latitudes.min()}..{latitudes.max()}")
    spacing = float((latitudes[1:] - latitudes[:-1]).abs().min()) if latitudes.numel() > 1 else 180.0
    pole_weight = math.sin(math.radians(spacing / 4))
    weights = torch.cos(torch.deg2rad(latitudes)).clamp_min(pole_weight)
    return weights / weights.mean()


def channel_weights(channel_names: Sequence[str], variables: Sequence[str], levels: Sequence[int | None]
                    ) -> torch.Tensor:
    """Default per-channel weights: :data:`VARIABLE_WEIGHTS` times ``level / mean level`` for
    upper-air channels; unknown variables get 1."""
    pressure = [level for level in levels if level is not None]
    mean_pressure = sum(pressure) / len(pressure) if pressure else 1.0
    weights = [VARIABLE_WEIGHTS.get(variable, 1.0) * (1.0 if level is None else level / mean_pressure)
               for variable, level in zip(variables, levels)]
    if len(weights) != len(channel_names):
        raise ValueError(f"channel_weights: {len(channel_names)} channel names but {len(weights)} variables/levels")
    return torch.tensor(weights, dtype=torch.float64)


class WeightedMSE(nn.Module):
    """The loss of one rank's block ``(batch, [steps,] tile_lat, tile_lon, local channels)``.

    Args:
        tile_latitude_weights: ``(tile_lat,)`` rows of :func:`latitude_weights` of the full grid.
        tile_channel_weights: ``(local channels,)`` this rank's slice of the channel weights.
        grid_points: ``n_lat * n_lon`` of the whole model grid.
        total_channel_weight: sum of the channel weights over all channels.
        mesh: the process mesh (None: serial); partial sums are reduced over its model group.
    """

    def __init__(self, tile_latitude_weights: torch.Tensor, tile_channel_weights: torch.Tensor, grid_points: int,
                 total_channel_weight: float, mesh: ProcessMesh | None = None):
        super().__init__()
        self.register_buffer("lat_weights", tile_latitude_weights.to(torch.float32)[:, None, None], persistent=False)
        self.register_buffer("channel_weights", tile_channel_weights.to(torch.float32), persistent=False)
        self.grid_points = int(grid_points)
        self.normaliser = float(grid_points) * float(total_channel_weight)
        self.mesh = mesh or ProcessMesh.serial()

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if prediction.shape != target.shape:
            raise ValueError(f"WeightedMSE: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} "
                             f"differ in shape")
        compute = torch.promote_types(prediction.dtype, torch.float32)
        error = (prediction.to(compute) - target.to(compute)).square()
        local = (error * self.lat_weights.to(compute) * self.channel_weights.to(compute)).sum()
        samples = math.prod(prediction.shape[:-3])  # batch (and rollout steps)
        others = all_reduce_sum(local.detach(), self.mesh.model_group) - local.detach()
        return (local + others) / (samples * self.normaliser)
