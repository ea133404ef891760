"""A weight block's draw with its KL divergence (``parallel.weight_draw``): the values and the
gradients of the expressions it fuses, and a model's sample held for a rollout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from parallel.rng import flat_index, normal_from_key
from parallel.weight_draw import draw_weight
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer

PRIOR_STD = 0.7
GLOBAL_SHAPE = (9, 13)
ROWS, COLUMNS = torch.tensor([8, 0, 3, 5, 2, 7]), torch.tensor([12, 1, 4, 0, 9, 6, 11, 3, 7, 10])  # a scattered block
KEY = torch.tensor(0x5DEECE66D123, dtype=torch.int64)


def block(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    shape = (len(ROWS), len(COLUMNS))
    mu = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
    rho = (torch.randn(shape, generator=generator, dtype=dtype) - 2).requires_grad_()
    return mu, rho


def draw(mu, rho):
    return draw_weight(mu, rho, KEY, ROWS * GLOBAL_SHAPE[1], COLUMNS, PRIOR_STD)


def expressions(mu, rho):
    """The draw and the KL, written out: the normals at the block's global positions, and
    ``log(p / s) + (s^2 + m^2) / (2 p^2) - 1/2`` per element."""
    eps = normal_from_key(KEY, flat_index((ROWS, COLUMNS), GLOBAL_SHAPE, "cpu")).to(mu.dtype)
    sigma = F.softplus(rho)
    kl = (torch.log(PRIOR_STD / sigma) + (sigma**2 + mu**2) / (2 * PRIOR_STD**2) - 0.5).sum()
    return mu + sigma * eps, kl


def test_the_draw_and_its_kl_are_the_expressions():
    mu, rho = block()
    (weight, kl), (expected, expected_kl) = draw(mu, rho), expressions(mu, rho)
    assert weight.dtype == mu.dtype and weight.shape == mu.shape
    assert torch.allclose(weight, expected, rtol=1e-14, atol=0)
    assert math.isclose(kl.item(), expected_kl.item(), rel_tol=1e-12)
    assert not torch.equal(weight, draw_weight(mu, rho, KEY + 1, ROWS * GLOBAL_SHAPE[1], COLUMNS, PRIOR_STD)[0])


@pytest.mark.parametrize("through", ["weight", "kl", "both"])
def test_gradients_are_the_expressions_gradients(through):
    """The closed-form backward against autograd through the expressions, with the gradient
    reaching the weight, the KL or both (an unused output has no gradient)."""
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(len(ROWS), len(COLUMNS), generator=generator, dtype=torch.float64)
    kl_weight = 0.37

    def gradients(function):
        mu, rho = block()
        weight, kl = function(mu, rho)
        loss = {"weight": (weight * upstream).sum(), "kl": kl_weight * kl,
                "both": (weight * upstream).sum() + kl_weight * kl}[through]
        return torch.autograd.grad(loss, (mu, rho))

    for got, expected, name in zip(gradients(draw), gradients(expressions), ("mu", "rho")):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14), f"d/d {name} through {through}"


CONFIG = ModelConfig(lat=8, lon=16, in_channels=3, out_channels=3, static_channels=1, forcing_channels=2,
                     patch=(1, 4), hidden=16, depth=1, token_fraction=0.5, bayesian=("all",), init_sigma=0.1)


def inputs(config: ModelConfig):
    generator = torch.Generator().manual_seed(2)
    lat, lon = config.model_lat, config.model_lon
    return (torch.randn(1, lat, lon, config.in_channels, generator=generator),
            torch.randn(lat, lon, config.static_channels, generator=generator),
            torch.randn(1, 2, lat, lon, config.forcing_channels, generator=generator))


def test_a_drawn_sample_is_held_for_the_rollout_until_the_next_choice():
    model = WeatherMixer(CONFIG, seed=1)
    state, static, forcings = inputs(CONFIG)
    model.draw_weights(3, 1)
    drawn_at_each_forward = model.rollout(state, static, forcings, 2, "autoregressive")
    kl = model.draw_sample()
    assert torch.allclose(kl, model.kl_divergence(), rtol=1e-6, atol=0)
    with torch.no_grad():  # the held blocks are what the forwards use: the means no longer matter
        held = model.rollout(state, static, forcings, 2, "autoregressive")
        model.embed.weight_mu.add_(1.0)
        assert torch.equal(model.rollout(state, static, forcings, 2, "autoregressive"), held)
        model.embed.weight_mu.sub_(1.0)
    assert torch.allclose(held, drawn_at_each_forward, rtol=1e-6, atol=1e-6)
    model.draw_weights(3, 2)  # a new choice drops the held sample
    assert model.noise.held("embed") is None
    assert not torch.allclose(model.rollout(state, static, forcings, 2, "autoregressive"), held)
    model.draw_sample()
    model.release_sample()
    assert model.noise.held("embed") is None
    model.use_mean_weights()
    assert torch.equal(model.draw_sample(), model.kl_divergence())  # the means: nothing drawn, the KL alone
    assert model.noise.held("embed") is None
