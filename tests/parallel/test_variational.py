"""Mean-field Gaussian layers: mesh-invariant noise, and parallel == serial for the same draw.

For a given ``(seed, step, sample)`` every rank draws its block of the serial model's weight
noise, so each variational layer on a mesh gives the serial outputs and the serial gradients of
``mu`` and ``rho``; the KL reduced over the model group is the serial KL; the means alone are
the deterministic layer.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from parallel.layers import LayerFactory
from parallel.rng import normal_at
from parallel.sharding import load_full_state
from parallel.variational import WeightNoise, gaussian_kl_divergence, global_kl_divergence, inverse_softplus
from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, compare_gradients, copy_into, relative_error
from tests.parallel.test_layers import PATCH, TOKEN_GRID, token_block

HIDDEN, WIDER, TOKEN_HIDDEN, BATCH = 5, 7, 23, 2
INIT_SEED, NOISE_SEED, STEP, SAMPLE = 3, 11, 5, 1
PRIOR_STD, INIT_SIGMA = 0.5, 0.01
TOLERANCE = 1e-10  # float64

# ---------------------------------------------------------------------------------------------
# normal_at


def test_normal_at_is_standard_normal():
    """Mean 0, std 1, the normal CDF (Kolmogorov-Smirnov), its tails, no correlation between
    neighbours in either dimension nor between keys (one million values; fixed, so not flaky)."""
    shape = (1000, 1000)
    index = (torch.arange(shape[0]), torch.arange(shape[1]))
    z = normal_at(0, "test", index=index, global_shape=shape)
    other_key = normal_at(0, "test", 1, index=index, global_shape=shape).double()
    n = z.numel()
    assert z.dtype == torch.float32 and z.shape == shape
    z = z.double()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 4 / math.sqrt(2 * n)
    ordered = z.flatten().sort().values
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((torch.special.ndtr(ordered) - empirical).abs().max()) < 1.63 / math.sqrt(n)  # 1% level
    for threshold in (2.0, 3.0, 4.0):
        expected = 2 * float(torch.special.ndtr(torch.tensor(-threshold, dtype=torch.float64)))
        observed = float((z.abs() > threshold).double().mean())
        assert abs(observed - expected) < 5 * math.sqrt(expected / n), f"P(|z| > {threshold}) = {observed}"
    assert float(z.abs().max()) <= 5.2948  # the uniform lattice's limit, documented in normal_from_key
    for a, b, what in [(z[:, 1:], z[:, :-1], "neighbours along dim 1"), (z[1:], z[:-1], "neighbours along dim 0"),
                       (z, other_key, "two keys")]:
        correlation = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(correlation) < 4 / math.sqrt(n), f"correlation of {what}: {correlation}"


def test_normal_at_shard_is_the_slice_of_the_full_tensor():
    """Any block (non-contiguous, out of order, as a domain tile's tokens) gets the full tensor's values."""
    shape = (13, 4, 9)
    full = normal_at(7, "weight-noise", 2, 0, "layer.weight", index=tuple(torch.arange(s) for s in shape),
                     global_shape=shape)
    index = (torch.tensor([11, 2, 5]), torch.tensor([3, 0]), torch.tensor([8, 1, 2, 7]))
    block = normal_at(7, "weight-noise", 2, 0, "layer.weight", index=index, global_shape=shape)
    assert torch.equal(block, full[index[0]][:, index[1]][:, :, index[2]])
    assert not torch.equal(full, normal_at(8, "weight-noise", 2, 0, "layer.weight",
                                           index=tuple(torch.arange(s) for s in shape), global_shape=shape))


def test_normal_at_names_a_mismatched_index():
    with pytest.raises(ValueError, match="one index tensor per dimension"):
        normal_at(0, "x", index=(torch.arange(3),), global_shape=(3, 2))


# ---------------------------------------------------------------------------------------------
# one process: the draw, the KL, the errors


def serial_channel_linear(noise: WeightNoise, name: str = "layer", inputs: int = HIDDEN, outputs: int = WIDER):
    layers = LayerFactory(None, TOKEN_GRID, PATCH)
    module = layers.variational_channel_linear(layers.channels(inputs), layers.channels(outputs), noise,
                                               PRIOR_STD, INIT_SIGMA).double()
    module.reset_parameters(INIT_SEED, name)
    return module


def test_the_draw_decides_the_noise():
    """The same (seed, step, sample) draws the same weights; another sample, step, seed or layer
    name draws others; weight and bias get independent noise."""
    noise = WeightNoise(NOISE_SEED)
    module = serial_channel_linear(noise)

    def weights(step, sample, layer=module):
        noise.draw(step, sample)
        weight, bias = layer.local_weights()
        return torch.cat([weight.flatten(), bias]).detach()

    first = weights(STEP, SAMPLE)
    assert torch.equal(first, weights(STEP, SAMPLE))
    for other, what in [(weights(STEP, SAMPLE + 1), "another sample"), (weights(STEP + 1, SAMPLE), "another step"),
                        (weights(STEP, SAMPLE, serial_channel_linear(noise, "other")), "another layer")]:
        assert not torch.equal(first, other), f"{what} drew the same weights"
    reseeded = serial_channel_linear(WeightNoise(NOISE_SEED + 1))
    reseeded.noise.draw(STEP, SAMPLE)
    assert not torch.equal(first, torch.cat([w.flatten() for w in reseeded.local_weights()]).detach())
    eps_weight = (first[:-WIDER] - module.weight_mu.flatten()) / INIT_SIGMA
    eps_bias = (first[-WIDER:] - module.bias_mu) / INIT_SIGMA
    assert not torch.allclose(eps_weight[:WIDER], eps_bias), "weight and bias share their noise"


def test_initialisation_matches_the_deterministic_layer():
    """``mu`` is the deterministic layer's initial weight (same keys), ``sigma`` the initial sigma."""
    layers = LayerFactory(None, TOKEN_GRID, PATCH)
    deterministic = layers.channel_linear(layers.channels(HIDDEN), layers.channels(WIDER)).double()
    deterministic.reset_parameters(INIT_SEED, "layer")
    module = serial_channel_linear(WeightNoise(NOISE_SEED))
    assert torch.equal(module.weight_mu, deterministic.weight) and torch.equal(module.bias_mu, deterministic.bias)
    for rho in (module.weight_rho, module.bias_rho):
        assert torch.allclose(F.softplus(rho), torch.full_like(rho, INIT_SIGMA), rtol=1e-12, atol=0)
    for sigma in (1e-6, 0.01, 1.0, 50.0, 800.0):
        assert math.isclose(float(F.softplus(torch.tensor(inverse_softplus(sigma), dtype=torch.float64))), sigma,
                            rel_tol=1e-12)


def test_kl_divergence_closed_form():
    """A 1 -> 2 layer with bias against ``log(p / s) + (s^2 + m^2) / (2 p^2) - 1/2`` per element, by hand."""
    module = serial_channel_linear(WeightNoise(NOISE_SEED), inputs=1, outputs=2)
    mus, sigmas = [0.3, -1.2, 0.0, 2.0], [0.1, 0.5, 1.0, 0.05]  # weight (2 x 1), then bias (2)
    with torch.no_grad():
        for param, values in [(module.weight_mu, mus[:2]), (module.bias_mu, mus[2:])]:
            param.copy_(torch.tensor(values, dtype=torch.float64).reshape(param.shape))
        for param, values in [(module.weight_rho, sigmas[:2]), (module.bias_rho, sigmas[2:])]:
            param.copy_(torch.tensor([inverse_softplus(s) for s in values], dtype=torch.float64).reshape(param.shape))
    p = PRIOR_STD
    expected = sum(math.log(p / s) + (s * s + m * m) / (2 * p * p) - 0.5 for m, s in zip(mus, sigmas))
    assert math.isclose(float(module.kl_divergence().detach()), expected, rel_tol=1e-12)
    assert math.isclose(float(global_kl_divergence(module, None).detach()), expected, rel_tol=1e-12)
    # the prior itself has no divergence
    zero = gaussian_kl_divergence(torch.zeros(3), torch.full((3,), inverse_softplus(p)), p)
    assert abs(float(zero)) < 1e-6


def test_mistakes_are_named():
    noise = WeightNoise(NOISE_SEED)
    module = serial_channel_linear(noise)
    x = torch.zeros(3, BATCH, HIDDEN, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"no weight draw chosen for layer:"):
        module(x)
    with pytest.raises(ValueError, match=r"step=-1"):
        noise.draw(-1, 0)
    layers = LayerFactory(None, TOKEN_GRID, PATCH)
    with pytest.raises(ValueError, match="prior_std = 0"):
        layers.variational_channel_linear(layers.channels(2), layers.channels(2), noise, prior_std=0)
    with pytest.raises(ValueError, match="init_sigma = -0.1"):
        layers.variational_token_linear(layers.tokens, layers.token_features(4), layers.channels(2), noise,
                                        init_sigma=-0.1)
    unnamed = layers.variational_channel_linear(layers.channels(2), layers.channels(2), noise)
    noise.draw(0, 0)
    with pytest.raises(RuntimeError, match="no name to key its weight noise"):
        unnamed(torch.zeros(3, BATCH, 2))
    assert float(global_kl_divergence(layers.channel_linear(layers.channels(2), layers.channels(2)), None)) == 0


# ---------------------------------------------------------------------------------------------
# parallel == serial


def build_case(name: str, layers: LayerFactory, noise: WeightNoise):
    """``(variational layer, deterministic twin, take input block, take output block, global input
    shape, global output shape)`` on ``(tokens, batch, channels)``; ``name/schedule`` forces a
    token linear's schedule."""
    name, _, schedule = name.partition("/")
    tokens, n = layers.tokens, TOKEN_GRID[0] * TOKEN_GRID[1]
    hidden, wider, features = layers.channels(HIDDEN), layers.channels(WIDER), layers.token_features(TOKEN_HIDDEN)
    if name.startswith("channel"):
        inputs, outputs = (hidden, wider) if name == "channel-widen" else (wider, hidden)
        pair = (layers.variational_channel_linear(inputs, outputs, noise, PRIOR_STD, INIT_SIGMA),
                layers.channel_linear(inputs, outputs))
        return (*pair, token_block(layers, tokens, inputs), token_block(layers, tokens, outputs),
                (n, BATCH, inputs.size), (n, BATCH, outputs.size))
    inputs, outputs = (tokens, features) if name == "token-to-features" else (features, tokens)
    pair = (layers.variational_token_linear(inputs, outputs, hidden, noise, PRIOR_STD, INIT_SIGMA),
            layers.token_linear(inputs, outputs, hidden))
    for module in pair:
        module.schedule = schedule
    return (*pair, token_block(layers, inputs, hidden), token_block(layers, outputs, hidden),
            (inputs.size, BATCH, HIDDEN), (outputs.size, BATCH, HIDDEN))


CASES = ["channel-widen", "channel-narrow", "token-to-features/weight", "token-to-features/activations",
         "features-to-token/weight", "features-to-token/activations"]


def randomize(module, generator) -> None:
    """Means of order one and scales around 0.2, so the noise moves the outputs visibly."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            values = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.copy_(values if name.endswith("_mu") else 0.5 * values - 1.5)


def check_case(name: str, serial_layers: LayerFactory, layers: LayerFactory) -> dict[str, float | bool]:
    """One layer on one mesh against the serial layer, for the same (seed, step, sample)."""
    generator = torch.Generator().manual_seed(CASES.index(name))  # the same on every rank
    serial_noise, noise = WeightNoise(NOISE_SEED), WeightNoise(NOISE_SEED)
    serial, _, _, _, in_shape, out_shape = build_case(name, serial_layers, serial_noise)
    module, deterministic, take_input, take_output, _, _ = build_case(name, layers, noise)
    for layer in (serial, module, deterministic):
        layer.double().reset_parameters(INIT_SEED, "layer")
    result = dict(initial_mu=all(torch.equal(getattr(module, f"{w}_mu"), getattr(deterministic, w))
                                 for w in ("weight", "bias")),
                  initial=max(relative_error(p, p.shard.take(dict(serial.named_parameters())[n]))
                              for n, p in module.named_parameters()))
    randomize(serial, generator)
    copy_into(module, serial)
    x = torch.randn(in_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(out_shape, generator=generator, dtype=torch.float64)

    serial_noise.draw(STEP, SAMPLE)
    noise.draw(STEP, SAMPLE)
    expected = serial(x)
    (expected * weights).sum().backward()
    local_x = take_input(x.detach()).clone().requires_grad_()
    out = module(local_x)
    (out * take_output(weights)).sum().backward()
    result.update(output=relative_error(out, take_output(expected)),
                  input_gradient=relative_error(local_x.grad, take_input(x.grad)),
                  parameter_gradient=max(compare_gradients(module, serial).values()))

    for layer in (serial, module):
        layer.zero_grad()
    serial_kl, kl = serial.kl_divergence(), global_kl_divergence(module, layers.mesh)
    serial_kl.backward()
    kl.backward()
    result.update(kl=relative_error(kl, serial_kl), kl_gradient=max(compare_gradients(module, serial).values()))

    noise.use_mean_weights()
    load_full_state(deterministic, {"weight": serial.weight_mu.detach(), "bias": serial.bias_mu.detach()})
    with torch.no_grad():
        result.update(mean_weights_equal_deterministic=torch.equal(module(local_x), deterministic(local_x)),
                      mean_weights_differ_from_draw=not torch.equal(module(local_x), out))
    return result


def check_meshes(rank, world_size, meshes):
    serial_layers = LayerFactory(None, TOKEN_GRID, PATCH)
    results = []
    for domain, tensor in meshes:
        layers = LayerFactory(build_mesh(domain, tensor), TOKEN_GRID, PATCH)
        results += [(name, domain, tensor, check_case(name, serial_layers, layers)) for name in CASES]
    return results


MESHES = {
    2: [((1, 1), 2), ((2, 1), 1)],
    4: [((1, 2), 2), ((2, 1), 2), ((4, 1), 1), ((1, 1), 4)],
}


@functools.cache
def run(world_size: int):
    return spawn(check_meshes, world_size, MESHES[world_size])


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_variational_layers_match_serial(world_size):
    checked = set()
    for rank, results in enumerate(run(world_size)):
        for name, domain, tensor, result in results:
            where = f"{name}, domain {domain[0]}x{domain[1]}, tensor {tensor}, rank {rank}"
            for key in ("initial", "output", "input_gradient", "parameter_gradient", "kl", "kl_gradient"):
                assert result[key] <= TOLERANCE, f"{where}: {key} relative error {result[key]:.2e}"
            for key in ("initial_mu", "mean_weights_equal_deterministic", "mean_weights_differ_from_draw"):
                assert result[key], f"{where}: {key} is false"
            checked.add((name, domain, tensor))
    assert len(checked) == len(CASES) * len(MESHES[world_size])
