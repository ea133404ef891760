"""Parameter and FLOP formulas against the built model and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from weathermixer.config import PRESETS, ModelConfig, preset
from weathermixer.counts import (flop_breakdown, forward_flops, parameter_count, recomputed_flops,
                                 training_flops)
from weathermixer.model import WeatherMixer

SMALL = ModelConfig(lat=9, lon=16, in_channels=5, out_channels=4, static_channels=2, forcing_channels=3,
                    patch=(1, 4), hidden=12, depth=2, token_fraction=0.75, channel_fraction=1.5)
SQUARE = SMALL.replace(out_channels=5)  # autoregressive rollouts feed the output back in
VARIANTS = {
    "default": {},
    "2d-patch-pad": dict(patch=(2, 4), grid_policy="pad"),
    "add-residual-no-skip": dict(residual="add", out_channels=5, decoder_skip=False),
    "add-merge-latent": dict(decoder_merge="add", latent_steps=2, depth=3),
    "no-forcings": dict(forcing_channels=0, static_channels=0),
}


def inputs(config: ModelConfig, batch: int = 1, steps: int | None = None, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    grid = (config.model_lat, config.model_lon)
    state = torch.randn(batch, *grid, config.in_channels, generator=generator, dtype=dtype)
    static = torch.randn(*grid, config.static_channels, generator=generator, dtype=dtype)
    shape = (batch, *grid, config.forcing_channels) if steps is None else (batch, steps, *grid,
                                                                           config.forcing_channels)
    return state, static, torch.randn(*shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_formula_matches_the_model(variant):
    config = SMALL.replace(**VARIANTS[variant])
    model = WeatherMixer(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_formula_matches_every_preset_on_meta(name):
    config = preset(name)
    with torch.device("meta"):
        model = WeatherMixer(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_paper_parameter_counts():
    # the authors' log for jigsaw-1b: 1,062,380,154; ours has a per-position recovery bias (+59 x 69)
    assert parameter_count(preset("jigsaw-1b")) == 1_062_380_154 + 59 * 69
    for name, paper in (("jigsaw-1.4b", 1404.9e6), ("jigsaw-2.6b", 2569.4e6), ("jigsaw-3.2b", 3.2e9)):
        assert abs(parameter_count(preset(name)) / paper - 1) < 0.02, name
    assert abs(forward_flops(preset("jigsaw-1b")) / 13.5657e12 - 1) < 0.01


def measured(config: ModelConfig, steps: int = 1, mode: str = "autoregressive", batch: int = 1,
             backward: bool = False) -> int:
    model = WeatherMixer(config)
    state, static, forcings = inputs(config, batch, steps)
    with FlopCounterMode(display=False) as counter:
        out = model.rollout(state, static, forcings, steps, mode)
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_flops_match_flop_counter(variant):
    config = SMALL.replace(**VARIANTS[variant])
    assert measured(config) == pytest.approx(forward_flops(config), rel=0.01)
    assert measured(config, batch=2) == pytest.approx(2 * forward_flops(config), rel=0.01)


@pytest.mark.parametrize("mode", ["autoregressive", "latent"])
def test_rollout_flops_match_flop_counter(mode):
    assert measured(SQUARE, steps=3, mode=mode) == pytest.approx(forward_flops(SQUARE, 3, mode), rel=0.01)
    assert forward_flops(SQUARE, 3, "latent") < forward_flops(SQUARE, 3, "autoregressive")


@pytest.mark.parametrize("checkpointing,dropout", [(False, 0.0), (True, 0.0), (True, 0.1)],
                         ids=["plain", "checkpointed", "checkpointed-dropout"])
def test_training_flops_match_flop_counter(checkpointing, dropout):
    config = SQUARE.replace(activation_checkpointing=checkpointing, dropout=dropout)
    # autograd skips the input gradient of the embedding (data inputs): one embedding forward
    # fewer than the 3x convention
    expected = training_flops(config, 2) - flop_breakdown(config)["embedding"]
    assert measured(config, steps=2, backward=True) == pytest.approx(expected, rel=0.01)
    assert training_flops(config, 2) - 3 * forward_flops(config, 2) == (recomputed_flops(config, 2)
                                                                       if checkpointing else 0)
    assert training_flops(SMALL, 1, True) > training_flops(SMALL, 1, False)


def test_bad_rollout_arguments_are_named():
    with pytest.raises(ValueError, match="rollout steps"):
        forward_flops(SMALL, 0)
    with pytest.raises(ValueError, match="rollout mode"):
        training_flops(SMALL, 1, False, "beam")
