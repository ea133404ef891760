"""FP8 matrix products: the numbers of e4m3/e5m2 operands with tensorwise scales, the serial
model's scales on every mesh, and a clear refusal where FP8 cannot run.

Why the parallel tolerance is tight: a rank's operand blocks are exact slices of the serial
operands and the scales are the serial ones (a maximum over the model group), so every element
is cast to the same FP8 value as in the serial layer; what remains is the order of the float32
sums (partial products over a split contraction, then a reduce-scatter), as in float32 layers.
"""

from __future__ import annotations

import functools

import pytest
import torch

from parallel.fp8 import (BACKWARD, FORWARD, GRADIENT, INPUT, WEIGHT, FP8Error, FP8MatMul, _to_fp8,
                          advance_histories, check_fp8_device, delayed_products, histories_loaded)
from parallel.layers import LayerFactory
from parallel.sharding import load_full_state
from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, compare_gradients, copy_into, relative_error
from tests.parallel.test_layers import PATCH, TOKEN_GRID, build_case, compare_case

FP8_CASES = ["channel-widen", "channel-narrow", "token-to-features/weight", "token-to-features/activations",
             "features-to-token/weight", "features-to-token/activations"]


def _dequantised(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    operand = _to_fp8(x, dtype, None)
    assert operand.rows.is_contiguous() and operand.columns.t().is_contiguous()  # both layouts, same values
    assert torch.equal(operand.columns.contiguous().view(torch.uint8), operand.rows.view(torch.uint8))
    rows, columns = operand.shape
    return operand.rows[:rows, :columns].double() * operand.inverse_scale.double()


@pytest.mark.parametrize("forward_in_fp8", [True, False], ids=["fp8", "fp8-backward"])
@pytest.mark.parametrize("m, k, n", [(48, 64, 32), (40, 60, 20)])  # the second padded to multiples of 16
def test_products_are_those_of_the_fp8_operands(m, k, n, forward_in_fp8):
    """Forward's product of the FP8 operands (or, ``forward_in_fp8`` off, the operands' own
    product), and backward's two products of FP8 operands either way."""
    generator = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(m, k, generator=generator, dtype=torch.float64)).requires_grad_()
    b = torch.randn(k, n, generator=generator, dtype=torch.float64).requires_grad_()
    out = FP8MatMul(forward_in_fp8=forward_in_fp8)(a, b)
    assert out.shape == (m, n)
    if forward_in_fp8:
        expected = _dequantised(a, FORWARD) @ _dequantised(b, FORWARD)
        assert relative_error(out, expected) < 1e-6  # the float32 accumulation
        exact = relative_error(out, a @ b)
        assert 1e-3 < exact < 0.06  # FP8, not a wider format: e4m3 keeps 3 mantissa bits
    else:
        assert torch.equal(out, a @ b)
    grad = torch.randn(m, n, generator=generator, dtype=torch.float64)
    out.backward(grad)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    g = _dequantised(grad, BACKWARD)
    assert relative_error(a.grad, g @ _dequantised(b, FORWARD).t()) < 1e-6
    assert relative_error(b.grad, _dequantised(a, FORWARD).t() @ g) < 1e-6


def test_gradients_come_in_the_layout_of_their_operands():
    """A weight passed transposed (``w.t()``, as the channel linears pass theirs) gets its gradient
    column-major, so ``w`` receives it row-major: no strided copy into ``w.grad`` each step. The
    values are those of the row-major products."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(48, 64, generator=generator).requires_grad_()
    w = torch.randn(32, 64, generator=generator).requires_grad_()
    grad = torch.randn(48, 32, generator=generator)
    wt = w.t()
    grad_a, grad_wt = torch.autograd.grad(FP8MatMul()(a, wt), (a, wt), grad)
    assert grad_a.is_contiguous() and grad_wt.t().is_contiguous()
    grad_a_row, grad_wt_row = torch.autograd.grad(FP8MatMul()(a, wt.contiguous()), (a, wt), grad)
    assert grad_wt_row.is_contiguous()
    torch.testing.assert_close(grad_wt, grad_wt_row, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_a, grad_a_row, rtol=0, atol=0)


def test_tensorwise_scale_maps_the_largest_value_to_the_format_maximum():
    x = torch.tensor([[0.5, -3.0], [1e-3, 2.0]])
    values, _, inverse, _ = _to_fp8(x, FORWARD, None)
    assert values.shape == (16, 16) and not values[2:].float().any() and not values[:, 2:].float().any()  # padding
    assert float(values.float().abs().max()) == torch.finfo(FORWARD).max
    assert float(inverse) == pytest.approx(3.0 / torch.finfo(FORWARD).max)
    zeros = _to_fp8(torch.zeros(2, 2), FORWARD, None).rows  # no division by zero
    assert not zeros.float().abs().sum()


def _fp8(forward_in_fp8: bool):
    def prepare(module, layers):  # the serial mesh has no model group: one rank
        module.fp8 = FP8MatMul(layers.mesh.model_group, forward_in_fp8=forward_in_fp8)
    return prepare


def check_fp8_layers(rank, world_size, meshes):
    results = []
    for domain, tensor in meshes:
        layers = LayerFactory(build_mesh(domain, tensor), TOKEN_GRID, PATCH)
        for name in FP8_CASES:
            for forward_in_fp8 in (True, False):
                errors = compare_case(name, layers, torch.float64, FP8_CASES.index(name), prepare=_fp8(forward_in_fp8))
                results.append((name, forward_in_fp8, domain, tensor, *errors))
    return results


DELAYED_STEPS = (1.0, 8.0, 0.25)  # input magnitude per step: each step's scale differs from its operands'


def _delayed(module, layers, forward_in_fp8: bool = True):
    module.fp8 = FP8MatMul(layers.mesh.model_group, "delayed", 2, forward_in_fp8)


def delayed_steps(name: str, layers: LayerFactory, seed: int, forward_in_fp8: bool = True) -> list[tuple]:
    """``DELAYED_STEPS`` training steps of case ``name`` in FP8 ``delayed`` (``forward_in_fp8``
    off: the gradient products alone) on ``layers``' mesh and serially: per step (output error,
    input-gradient error, worst parameter gradient error, history error, the serial history)."""
    generator = torch.Generator().manual_seed(seed)  # the same on every rank
    serial, _, _, in_shape, out_shape = build_case(name, LayerFactory(None, TOKEN_GRID, PATCH))
    serial = serial.double()
    _delayed(serial, LayerFactory(None, TOKEN_GRID, PATCH), forward_in_fp8)
    with torch.no_grad():
        for param in serial.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    module, take_input, take_output, _, _ = build_case(name, layers)
    module = module.double()
    _delayed(module, layers, forward_in_fp8)
    copy_into(module, serial)
    results = []
    for magnitude in DELAYED_STEPS:
        x = (magnitude * torch.randn(in_shape, generator=generator, dtype=torch.float64)).requires_grad_()
        weights = torch.randn(out_shape, generator=generator, dtype=torch.float64)
        for layer in (serial, module):
            layer.zero_grad()
        expected = serial(x)
        (expected * weights).sum().backward()
        local_x = take_input(x.detach()).clone().requires_grad_()
        out = module(local_x)
        (out * take_output(weights)).sum().backward()
        gradients = compare_gradients(module, serial)
        advance_histories([serial.fp8, module.fp8])  # the step's amaxes, reduced over all ranks
        results.append((relative_error(out, take_output(expected)), relative_error(local_x.grad, take_input(x.grad)),
                        max(gradients.values()), relative_error(module.fp8.amax_history, serial.fp8.amax_history),
                        serial.fp8.amax_history.clone()))
    return results


def check_delayed_layers(rank, world_size, meshes):
    results = []
    for domain, tensor in meshes:
        layers = LayerFactory(build_mesh(domain, tensor), TOKEN_GRID, PATCH)
        for name in FP8_CASES:
            for forward_in_fp8 in (True, False):
                steps = delayed_steps(name, layers, FP8_CASES.index(name), forward_in_fp8)
                results.append((name, forward_in_fp8, domain, tensor, steps))
    return results


MESHES = {2: [((1, 1), 2), ((2, 1), 1), ((1, 2), 1)], 4: [((2, 1), 2), ((1, 1), 4), ((2, 2), 1)]}


def check_both_recipes(rank, world_size, meshes):
    return check_fp8_layers(rank, world_size, meshes), check_delayed_layers(rank, world_size, meshes)


@functools.cache
def run(world_size: int):
    return spawn(check_both_recipes, world_size, MESHES[world_size])


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_fp8_layers_match_the_serial_fp8_layers(world_size):
    """Every product in FP8, and the gradient products alone (``forward_in_fp8`` off)."""
    checked = set()
    for rank, (results, _) in enumerate(run(world_size)):
        for name, forward_in_fp8, domain, tensor, output_error, input_error, worst, gradient_error in results:
            where = (f"{name}, forward in FP8 {forward_in_fp8}, domain {domain[0]}x{domain[1]}, tensor {tensor}, "
                     f"rank {rank}")
            assert output_error <= 1e-6, f"{where}: output relative error {output_error:.2e}"
            assert input_error <= 1e-6, f"{where}: input gradient relative error {input_error:.2e}"
            assert gradient_error <= 1e-6, f"{where}: gradient of {worst} relative error {gradient_error:.2e}"
            checked.add((name, forward_in_fp8, domain, tensor))
    assert len(checked) == 2 * len(FP8_CASES) * len(MESHES[world_size])


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_delayed_layers_match_the_serial_delayed_layers_over_steps(world_size):
    """Three steps with a history of two: the second casts with the first step's amaxes (8x too
    small for its inputs: they saturate alike), the third with the first two steps'. Every rank's
    history equals the serial one, so every element is cast alike on every mesh."""
    checked = set()
    for rank, (_, results) in enumerate(run(world_size)):
        for name, forward_in_fp8, domain, tensor, steps in results:
            for step, (output_error, input_error, gradient_error, history_error, history) in enumerate(steps):
                where = (f"{name}, forward in FP8 {forward_in_fp8}, domain {domain[0]}x{domain[1]}, tensor {tensor}, "
                         f"rank {rank}, step {step}")
                assert output_error <= 1e-6, f"{where}: output relative error {output_error:.2e}"
                assert input_error <= 1e-6, f"{where}: input gradient relative error {input_error:.2e}"
                assert gradient_error <= 1e-6, f"{where}: parameter gradient relative error {gradient_error:.2e}"
                assert history_error <= 1e-12, f"{where}: amax history relative error {history_error:.2e}"
                assert not history[:, 0].any() and (history[:, 1:step + 2] > 0).all(), f"{where}: {history}"
                assert not history[:, step + 2:].any(), f"{where}: entries beyond the steps taken: {history}"
            checked.add((name, forward_in_fp8, domain, tensor))
    assert len(checked) == 2 * len(FP8_CASES) * len(MESHES[world_size])


def replica_histories(rank, world_size):
    """Data replicas: each rank runs the same product on its own operands (inputs of magnitude
    rank + 1) for one step; returns its history after the step and every rank's input amax."""
    generator = torch.Generator().manual_seed(11 + rank)
    product = FP8MatMul(recipe="delayed", history=2)
    a = ((rank + 1) * torch.randn(48, 64, generator=generator, dtype=torch.float64)).requires_grad_()
    b = torch.randn(64, 32, generator=generator, dtype=torch.float64).requires_grad_()
    product(a, b).backward(torch.randn(48, 32, generator=generator, dtype=torch.float64))
    advance_histories([product])
    return product.amax_history.tolist(), float(_amax(a))  # plain numbers: no tensor outlives its process


def test_replicas_that_see_different_data_keep_one_history():
    """The amaxes of a step are reduced over every rank, data replicas too: every rank keeps the
    history of the largest operands any replica saw (the one a checkpoint saves), and casts alike."""
    results = spawn(replica_histories, 2)
    (first, _), (second, largest_input) = results
    assert first == second
    first = torch.tensor(first)
    assert float(first[INPUT, 1]) == max(amax for _, amax in results) == largest_input
    assert not first[:, 0].any() and (first[:, 1] > 0).all()


def _delayed_steps(product: FP8MatMul, steps: list[float], generator: torch.Generator) -> list[torch.Tensor]:
    """Training steps of ``product`` on operands of the given magnitudes: outputs and gradients."""
    results = []
    for magnitude in steps:
        a = (magnitude * torch.randn(48, 64, generator=generator, dtype=torch.float64)).requires_grad_()
        b = torch.randn(64, 32, generator=generator, dtype=torch.float64).requires_grad_()
        out = product(a, b)
        out.backward(magnitude * torch.randn(48, 32, generator=generator, dtype=torch.float64))
        results += [out.detach(), a.grad, b.grad]
        advance_histories([product])
    return results


def test_delayed_first_step_is_tensorwise_then_scales_from_the_history():
    generator = torch.Generator().manual_seed(3)
    a = (3 * torch.randn(48, 64, generator=generator, dtype=torch.float64)).requires_grad_()
    b = torch.randn(64, 32, generator=generator, dtype=torch.float64).requires_grad_()
    grad = torch.randn(48, 32, generator=generator, dtype=torch.float64)
    delayed = FP8MatMul(recipe="delayed", history=3)
    first = delayed(a, b)
    assert torch.equal(first, FP8MatMul()(a, b))  # an empty history: each operand's own amax
    first.backward(grad)
    history = delayed.amax_history
    for role, operand in ((INPUT, a), (WEIGHT, b), (GRADIENT, grad)):
        assert float(history[role, 0]) == _amax(operand) and not history[role, 1:].any()
    advance_histories([delayed])
    assert float(history[INPUT, 1]) == _amax(a) and not history[:, 0].any()
    # the second step casts with the first step's amaxes: half the inputs' values map as 2x
    halved = (a / 2).detach()
    expected = _dequantised_at(halved, _amax(a), FORWARD) @ _dequantised(b, FORWARD)
    assert relative_error(delayed(halved, b), expected) < 1e-6
    assert float(history[INPUT, 0]) == _amax(halved)


def _amax(x: torch.Tensor) -> float:
    return float(x.detach().abs().max().float())  # the history's float32


def _dequantised_at(x: torch.Tensor, amax: float, dtype: torch.dtype) -> torch.Tensor:
    scale = torch.finfo(dtype).max / torch.tensor(amax)  # in float32, as the product computes it
    return (x.float() * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).double() / scale


def test_delayed_operands_beyond_the_history_saturate_and_stay_finite():
    generator = torch.Generator().manual_seed(4)
    delayed = FP8MatMul(recipe="delayed", history=4)
    outputs = _delayed_steps(delayed, [1e-3, 1.0, 1e3], generator)  # each step 1000x its history
    assert all(torch.isfinite(tensor).all() for tensor in outputs)
    history = delayed.amax_history[[INPUT, GRADIENT], 1:4]  # the weights keep their magnitude
    assert (history[:, 0] > 100 * history[:, 1]).all() and (history[:, 1] > 100 * history[:, 2]).all()
    # an input 1000x the largest amax of its history: every element saturates at that amax
    largest = float(delayed.amax_history[INPUT, 1:].max())
    out = delayed(torch.full((16, 16), 1000 * largest, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    assert torch.isfinite(out).all()
    assert relative_error(out, torch.full((16, 16), largest, dtype=torch.float64)) < 0.07  # the eye's e4m3 rounding


def test_delayed_history_is_model_state():
    from weathermixer.config import ConfigError, preset
    from weathermixer.model import WeatherMixer

    config = preset("tiny").replace(fp8="delayed", fp8_history=5)
    model = WeatherMixer(config, seed=1)
    products = delayed_products(model)
    mixing = [f"blocks.{k}.{mlp}.fc{i}" for k in range(config.depth) for mlp in ("token_mlp", "channel_mlp")
              for i in (1, 2)]
    backward_only = ["embed", "recover", "residual_linear"]  # model.fp8_backward_groups' default
    assert len(products) == len(mixing) + len(backward_only)
    assert sorted(name for name in model.state_dict() if "amax" in name) == sorted(
        f"{layer}.fp8.amax_history" for layer in mixing + backward_only)
    assert all(product.amax_history.shape == (3, 6) for product in products)
    assert model.bfloat16().blocks[0].token_mlp.fc1.fp8.amax_history.dtype == torch.float32
    with torch.no_grad():
        model.blocks[0].token_mlp.fc1.fp8.amax_history[:, 1] = 2.0
    fresh = WeatherMixer(config, seed=1).bfloat16()
    load_full_state(fresh, model.state_dict())
    assert torch.equal(fresh.blocks[0].token_mlp.fc1.fp8.amax_history, model.blocks[0].token_mlp.fc1.fp8.amax_history)
    with_history = [name for name, module in fresh.named_modules() if getattr(module, "has_history", False)]
    assert with_history == ["blocks.0.token_mlp.fc1.fp8"]
    with pytest.raises(ConfigError, match="model.fp8_history = 0"):
        config.replace(fp8_history=0)
    with pytest.raises(FP8Error, match="FP8 recipe 'rowwise'"):
        FP8MatMul(recipe="rowwise")


@pytest.mark.parametrize("forward_in_fp8", [True, False], ids=["fp8", "fp8-backward"])
def test_a_compiled_delayed_product_neither_breaks_nor_recompiles_each_step(forward_in_fp8):
    """Two graphs in all (the first step scales by the operands' own amax, the later ones by the
    history), none broken, and the compiled histories and products those of eager."""
    from torch._dynamo.utils import counters

    from launch.runtime.compile import compiled

    torch._dynamo.reset()
    counters.clear()
    eager, compiled_product = (FP8MatMul(recipe="delayed", history=2, forward_in_fp8=forward_in_fp8)
                               for _ in range(2))
    steps = [1.0, 4.0, 0.5, 2.0, 1.0]
    expected = _delayed_steps(eager, steps, torch.Generator().manual_seed(5))
    compiled_product.forward = compiled(compiled_product.forward)
    actual = _delayed_steps(compiled_product, steps, torch.Generator().manual_seed(5))
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert all(relative_error(a, e) < 1e-6 for a, e in zip(actual, expected))
    assert torch.equal(compiled_product.amax_history, eager.amax_history)


def test_a_gpu_without_fp8_tensor_cores_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(FP8Error, match="NVIDIA A100 \\(compute capability 8.0\\).*8.9 or newer"):
        check_fp8_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("cuda")  # Hopper
    check_fp8_device("cpu")  # emulated: real FP8 numbers


def test_the_model_runs_its_chosen_groups_in_fp8():
    from weathermixer.config import ConfigError, preset
    from weathermixer.model import WeatherMixer

    config = preset("tiny")
    plain, fp8 = WeatherMixer(config, seed=1), WeatherMixer(config.replace(fp8="tensorwise"), seed=1)
    chosen = {name for name, module in fp8.named_modules()
              if getattr(module, "fp8", None) is not None and module.fp8.forward_in_fp8}
    assert chosen == {f"blocks.{k}.{mlp}.fc{i}" for k in range(config.depth) for mlp in ("token_mlp", "channel_mlp")
                      for i in (1, 2)}
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(2, config.model_lat, config.model_lon, config.in_channels, generator=generator)
    static = torch.randn(config.model_lat, config.model_lon, config.static_channels, generator=generator)
    forcings = torch.randn(2, 1, config.model_lat, config.model_lon, config.forcing_channels, generator=generator)
    difference = relative_error(fp8.rollout(state, static, forcings, 1), plain.rollout(state, static, forcings, 1))
    assert 1e-4 < difference < 0.1  # FP8's rounding, and nothing worse
    assert config.replace(fp8="tensorwise", fp8_groups="all").fp8_groups == ("all",)
    with pytest.raises(ConfigError, match="model.fp8 = 'rowwise'.*'delayed'"):
        config.replace(fp8="rowwise")
    with pytest.raises(ConfigError, match="model.fp8_backward_groups = 'head': unknown layer groups"):
        config.replace(fp8_backward_groups="head")


def test_backward_groups_keep_the_forward_and_run_the_gradients_in_fp8():
    """``model.fp8_backward_groups``: the embedding and the decoder give the prediction of the
    model whose products there are not FP8, and their gradient products add FP8 rounding of the
    size that the mixing layers' FP8 already gives every gradient (against float32)."""
    from weathermixer.config import preset
    from weathermixer.model import WeatherMixer

    config = preset("tiny").replace(fp8="tensorwise")
    assert config.fp8_backward_groups == ("embedding", "decoder")  # the default
    plain, model = WeatherMixer(config.replace(fp8="none"), seed=1), WeatherMixer(config, seed=1)
    mixing = WeatherMixer(config.replace(fp8_backward_groups="none"), seed=1)
    backward_only = {name for name, module in model.named_modules()
                     if getattr(module, "fp8", None) is not None and not module.fp8.forward_in_fp8}
    assert backward_only == {"embed", "recover", "residual_linear"}
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(2, config.model_lat, config.model_lon, config.in_channels, generator=generator)
    static = torch.randn(config.model_lat, config.model_lon, config.static_channels, generator=generator)
    forcings = torch.randn(2, 1, config.model_lat, config.model_lon, config.forcing_channels, generator=generator)
    nets = (plain, mixing, model)
    outputs = [net.rollout(state, static, forcings, 1) for net in nets]
    assert relative_error(outputs[2], outputs[1]) < 1e-6  # the same prediction
    weights = torch.randn(outputs[0].shape, generator=generator)
    for output in outputs:
        (output * weights).sum().backward()
    for name in ("embed.weight", "recover.weight", "residual_linear.weight", "blocks.0.token_mlp.fc1.weight"):
        plain_grad, mixing_grad, grad = (net.get_parameter(name).grad for net in nets)
        difference, mixing_difference = relative_error(grad, mixing_grad), relative_error(mixing_grad, plain_grad)
        assert 1e-3 < difference < mixing_difference, f"{name}: {difference:.2e} (mixing FP8: {mixing_difference:.2e})"
    with torch.no_grad():  # validation and forecasts: the same products, nothing cast
        assert relative_error(model.rollout(state, static, forcings, 1), outputs[1]) < 1e-6


def _tiny_losses(fp8: str, steps: int = 20) -> list[float]:
    """``steps`` Adam steps of the tiny model (fixed seeds and data) in ``fp8``: the losses."""
    from weathermixer.config import preset
    from weathermixer.model import WeatherMixer

    config = preset("tiny").replace(fp8=fp8, fp8_history=4)
    model = WeatherMixer(config, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    products = delayed_products(model)
    generator = torch.Generator().manual_seed(7)
    shape = (config.model_lat, config.model_lon)
    static = torch.randn(*shape, config.static_channels, generator=generator)
    losses = []
    for _ in range(steps):
        state = torch.randn(4, *shape, config.in_channels, generator=generator)
        forcings = torch.randn(4, 1, *shape, config.forcing_channels, generator=generator)
        target = 0.5 * state + 0.5 * state.roll(1, dims=2)  # a tendency the mixer can learn
        loss = (model.rollout(state, static, forcings, 1)[:, 0] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance_histories(products)
        losses.append(float(loss.detach()))
    return losses


def test_delayed_trains_as_float32_and_tensorwise():
    """The tiny model's loss over 20 steps in FP8 delayed (history of 4) stays within 3 % of the
    float32 loss at every step (within 1 % on average), and of
    tensorwise's, and falls as they do."""
    reference, tensorwise, delayed = _tiny_losses("none"), _tiny_losses("tensorwise"), _tiny_losses("delayed")
    for other in (reference, tensorwise):
        ratios = [d / r for d, r in zip(delayed, other)]
        assert max(abs(ratio - 1) for ratio in ratios) < 0.03, ratios
        assert abs(sum(ratios) / len(ratios) - 1) < 0.01, ratios
    assert delayed[-1] < 0.7 * delayed[0], delayed
