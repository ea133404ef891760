"""Perturbed initial states: training's per-sample augmentation and an ensemble's member perturbations."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel.rng import flat_index, mix_keys, normal_from_key, stream_seed
from weathermixer.model import WeatherMixer


class InputNoise:
    """The per-sample augmentation of the inputs: ``state + fraction * scale * eps`` in normalised
    units (``fraction`` of each channel's standard deviation, times ``channel_scale``, one factor
    per state channel, e.g. its tendency std over its std), ``eps`` a function of (seed, step,
    sample, time index, global grid point and channel), so a sample's noise is the same on any
    mesh; padded rows stay zero. ``fraction`` 0: the inputs as they are."""

    def __init__(self, model: WeatherMixer, seed: int, fraction: float, stored_rows: int,
                 channel_scale: Sequence[float] | None = None):
        self.seed, self.fraction = seed, fraction
        if fraction == 0:
            return
        config, layers = model.config, model.layers
        (lat0, lat1), (lon0, lon1) = layers.tile_bounds()
        self.rows = max(0, min(lat1, stored_rows) - lat0)
        device = next(model.parameters()).device
        index = (torch.arange(lat0, lat0 + self.rows), torch.arange(lon0, lon1),
                 model.state_channels.indices[model.mesh.tensor_rank])
        self.flat = flat_index(tuple(i.to(device) for i in index), (config.model_lat, config.model_lon,
                                                                   config.in_channels), device)
        self.key = torch.zeros((), dtype=torch.int64, device=device)
        local = model.state_channels.indices[model.mesh.tensor_rank].cpu()  # the scale is on the host
        scale = torch.ones(config.in_channels, dtype=torch.float64) if channel_scale is None else \
            torch.as_tensor(channel_scale, dtype=torch.float64)
        self.amplitude = (fraction * scale[local]).to(device)  # per local channel, in normalised units

    def __call__(self, state: torch.Tensor, time_indices: Sequence[int], step: int,
                 sample: int | Sequence[int]) -> torch.Tensor:
        """``state`` perturbed, row k with the noise of (``step``, sample, ``time_indices[k]``);
        ``sample``: one for every row, or one per row (members batched together)."""
        if self.fraction == 0:
            return state
        samples = list(sample) if isinstance(sample, Sequence) else [sample] * len(time_indices)
        if not len(samples) == len(time_indices) == state.shape[0]:
            raise ValueError(f"InputNoise: a batch of {state.shape[0]} states with {len(time_indices)} time indices "
                             f"and {len(samples)} samples; expected one time index (and one sample, or one for all) "
                             f"per state")
        noise = torch.stack([self._noise(step, int(row_sample), int(index))
                             for row_sample, index in zip(samples, time_indices)])
        out = state.clone()
        out[:, :self.rows] += (self.amplitude * noise).to(state.dtype)
        return out

    def _noise(self, step: int, sample: int, time_index: int) -> torch.Tensor:
        """eps of one sample at one time, on this rank's block of the global grid."""
        self.key.fill_(stream_seed(self.seed, "input-noise", step, sample))
        return normal_from_key(mix_keys(self.key, time_index), self.flat)
