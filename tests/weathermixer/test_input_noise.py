"""Input perturbations: per-channel units, and a store without tendency statistics refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.schema import StoreError
from launch.runtime.rank_inputs import noise_channel_scale
from weathermixer.config import preset
from weathermixer.input_noise import InputNoise
from weathermixer.model import WeatherMixer


def test_each_channel_is_perturbed_in_its_own_unit():
    config = preset("tiny")
    model = WeatherMixer(config, seed=0)
    state = torch.zeros(1, config.model_lat, config.model_lon, config.in_channels, dtype=torch.float64)
    scale = np.arange(1, config.in_channels + 1) / 4
    plain = InputNoise(model, 3, 0.5, config.model_lat)(state, (7,), 2, 1)
    scaled = InputNoise(model, 3, 0.5, config.model_lat, channel_scale=scale)(state, (7,), 2, 1)
    torch.testing.assert_close(scaled, plain * torch.as_tensor(scale), rtol=1e-12, atol=0)
    assert float(plain.std()) == pytest.approx(0.5, rel=0.1)


def test_tendency_units_need_tendency_statistics():
    class Attrs:
        std, tendency_std = [2.0, 4.0], [1.0, 1.0]

    np.testing.assert_allclose(noise_channel_scale(Attrs, "tendency", "s.zarr"), [0.5, 0.25])
    assert noise_channel_scale(Attrs, "std", "s.zarr") is None
    Attrs.tendency_std = []
    with pytest.raises(StoreError, match="s.zarr: no tendency statistics"):
        noise_channel_scale(Attrs, "tendency", "s.zarr")


def test_a_batch_of_members_is_perturbed_as_each_member_alone():
    config = preset("tiny")
    model = WeatherMixer(config, seed=0)
    noise = InputNoise(model, 3, 0.5, config.model_lat)
    state = torch.randn(3, config.model_lat, config.model_lon, config.in_channels, dtype=torch.float64)
    times, members = (7, 7, 8), (0, 1, 1)
    together = noise(state, times, 0, members)
    alone = [noise(state[k:k + 1], times[k:k + 1], 0, members[k]) for k in range(3)]
    assert torch.equal(together, torch.cat(alone))
    assert not torch.equal(together[0], together[1]) and not torch.equal(together[1], together[2])
    with pytest.raises(ValueError, match="expected one time index"):
        noise(state, times, 0, (0, 1))
