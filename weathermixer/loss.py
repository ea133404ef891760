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

from parallel.comm import all_reduce_sum, all_to_all
from parallel.mesh import ProcessMesh
from parallel.tiling import balanced_bounds

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


def ensemble_crps(members: torch.Tensor, truth: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The almost fair CRPS of the ensemble ``members`` (member axis first) at every value of
    ``truth`` (anemoi's afCRPS, Lang et al. 2024): ``alpha`` times the fair CRPS plus ``1 - alpha``
    times the standard one,

        mean_i |x_i - y|  -  (alpha / (2 M (M - 1)) + (1 - alpha) / (2 M^2)) sum_{i,j} |x_i - x_j|

    ``alpha = 1``: the fair CRPS (Ferro 2014), unbiased for the CRPS of the ensemble's distribution.
    This is the skill-spread (kernel) form, skill ``E|X - y|`` less spread ``E|X - X'| / 2``, as
    anemoi and Makani write it; the pair sum is taken over the sorted members in O(M log M)."""
    m = members.shape[0]
    if m < 2 and alpha != 0:
        raise ValueError(f"ensemble_crps: {m} member(s); the fair CRPS needs at least 2 (or alpha = 0)")
    skill = (members - truth).abs().mean(dim=0)
    # sum_{i,j} |x_i - x_j| = 2 sum_k (2k - M + 1) x_(k) over the sorted members: M values a point, not M^2
    rank_weights = 2 * torch.arange(m, device=members.device, dtype=members.dtype) - (m - 1)
    pairs = 2 * (rank_weights.reshape(-1, *[1] * (members.dim() - 1)) * members.sort(dim=0).values).sum(dim=0)
    spread = alpha / (2 * m * (m - 1)) if m > 1 else 0.0
    return skill - (spread + (1 - alpha) / (2 * m * m)) * pairs


class WeightedCRPS(nn.Module):
    """The area- and channel-weighted mean of the almost fair CRPS of an ensemble spread over the
    sample ranks, each holding ``members`` ``(local members, batch, [steps,] tile_lat, tile_lon,
    local channels)`` of its tile and channel slice; ``target`` has no member axis.

    The members are not gathered: an all-to-all over the sample group hands each sample rank
    every member on ``1 / sample ranks`` of the values (Makani's transposition), each scores its
    share, and the shares add up over the sample and model groups. The value is the whole
    ensemble's; the gradient of each rank's members is the serial one."""

    def __init__(self, tile_latitude_weights: torch.Tensor, tile_channel_weights: torch.Tensor, grid_points: int,
                 total_channel_weight: float, mesh: ProcessMesh | None = None, alpha: float = 1.0):
        super().__init__()
        self.register_buffer("lat_weights", tile_latitude_weights.to(torch.float32)[:, None, None], persistent=False)
        self.register_buffer("channel_weights", tile_channel_weights.to(torch.float32), persistent=False)
        self.grid_points, self.alpha = int(grid_points), float(alpha)
        self.normaliser = float(grid_points) * float(total_channel_weight)
        self.mesh = mesh or ProcessMesh.serial()

    def forward(self, members: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if members.shape[1:] != target.shape:
            raise ValueError(f"WeightedCRPS: members {tuple(members.shape)} do not end in the target's shape "
                             f"{tuple(target.shape)}; expected (members, *target shape)")
        compute = torch.promote_types(members.dtype, torch.float32)
        weights = (self.lat_weights * self.channel_weights).to(compute).expand(target.shape).reshape(-1)
        values, truth = members.to(compute).flatten(1), target.to(compute).reshape(-1)
        mesh = self.mesh
        group, ranks = mesh.group("sample"), mesh.config.sample
        part = balanced_bounds(values.shape[1], ranks)[mesh.sample_rank]
        sizes = [b - a for a, b in balanced_bounds(values.shape[1], ranks)]
        ensemble = all_to_all(values, 1, sizes, 0, [members.shape[0]] * ranks, group)  # all members, my values
        local = (ensemble_crps(ensemble, truth[part[0]:part[1]], self.alpha) * weights[part[0]:part[1]]).sum()
        total = all_reduce_sum(all_reduce_sum(local.detach(), group), mesh.model_group)
        samples = math.prod(target.shape[:-3])  # batch (and rollout steps)
        return (local + (total - local.detach())) / (samples * self.normaliser)
