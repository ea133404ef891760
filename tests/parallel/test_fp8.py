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

from parallel.fp8 import BACKWARD, FORWARD, FP8Error, FP8MatMul, _to_fp8, check_fp8_device
from parallel.layers import LayerFactory
from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, relative_error
from tests.parallel.test_layers import PATCH, TOKEN_GRID, compare_case

FP8_CASES = ["channel-widen", "channel-narrow", "token-to-features/weight", "token-to-features/activations",
             "features-to-token/weight", "features-to-token/activations"]


def _dequantised(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values, inverse = _to_fp8(x, dtype, None)
    return values.double() * inverse.double()


def test_products_are_those_of_the_fp8_operands():
    generator = torch.Generator().manual_seed(0)
    a = (3 * torch.randn(48, 64, generator=generator, dtype=torch.float64)).requires_grad_()
    b = torch.randn(64, 32, generator=generator, dtype=torch.float64).requires_grad_()
    out = FP8MatMul()(a, b)
    expected = _dequantised(a, FORWARD) @ _dequantised(b, FORWARD)
    assert relative_error(out, expected) < 1e-6  # the float32 accumulation
    exact = relative_error(out, a @ b)
    assert 1e-3 < exact < 0.06  # FP8, not a wider format: e4m3 keeps 3 mantissa bits
    grad = torch.randn(48, 32, generator=generator, dtype=torch.float64)
    out.backward(grad)
    g = _dequantised(grad, BACKWARD)
    assert relative_error(a.grad, g @ _dequantised(b, FORWARD).t()) < 1e-6
    assert relative_error(b.grad, _dequantised(a, FORWARD).t() @ g) < 1e-6


def test_tensorwise_scale_maps_the_largest_value_to_the_format_maximum():
    x = torch.tensor([[0.5, -3.0], [1e-3, 2.0]])
    values, inverse = _to_fp8(x, FORWARD, None)
    assert float(values.float().abs().max()) == torch.finfo(FORWARD).max
    assert float(inverse) == pytest.approx(3.0 / torch.finfo(FORWARD).max)
    zeros, _ = _to_fp8(torch.zeros(2, 2), FORWARD, None)  # no division by zero
    assert not zeros.float().abs().sum()


def _fp8(module, layers):
    module.fp8 = FP8MatMul(layers.mesh.model_group)  # the serial mesh has none: one rank


def check_fp8_layers(rank, world_size, meshes):
    results = []
    for domain, tensor in meshes:
        layers = LayerFactory(build_mesh(domain, tensor), TOKEN_GRID, PATCH)
        for name in FP8_CASES:
            results.append((name, domain, tensor,
                            *compare_case(name, layers, torch.float64, FP8_CASES.index(name), prepare=_fp8)))
    return results


MESHES = {2: [((1, 1), 2), ((2, 1), 1), ((1, 2), 1)], 4: [((2, 1), 2), ((1, 1), 4), ((2, 2), 1)]}


@functools.cache
def run(world_size: int):
    return spawn(check_fp8_layers, world_size, MESHES[world_size])


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_fp8_layers_match_the_serial_fp8_layers(world_size):
    checked = set()
    for rank, results in enumerate(run(world_size)):
        for name, domain, tensor, output_error, input_error, worst, gradient_error in results:
            where = f"{name}, domain {domain[0]}x{domain[1]}, tensor {tensor}, rank {rank}"
            assert output_error <= 1e-6, f"{where}: output relative error {output_error:.2e}"
            assert input_error <= 1e-6, f"{where}: input gradient relative error {input_error:.2e}"
            assert gradient_error <= 1e-6, f"{where}: gradient of {worst} relative error {gradient_error:.2e}"
            checked.add((name, domain, tensor))
    assert len(checked) == len(FP8_CASES) * len(MESHES[world_size])


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
    chosen = {name for name, module in fp8.named_modules() if getattr(module, "fp8", None) is not None}
    assert chosen == {f"blocks.{k}.{mlp}.fc{i}" for k in range(config.depth) for mlp in ("token_mlp", "channel_mlp")
                      for i in (1, 2)}
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(2, config.model_lat, config.model_lon, config.in_channels, generator=generator)
    static = torch.randn(config.model_lat, config.model_lon, config.static_channels, generator=generator)
    forcings = torch.randn(2, 1, config.model_lat, config.model_lon, config.forcing_channels, generator=generator)
    difference = relative_error(fp8.rollout(state, static, forcings, 1), plain.rollout(state, static, forcings, 1))
    assert 1e-4 < difference < 0.1  # FP8's rounding, and nothing worse
    assert config.replace(fp8="tensorwise", fp8_groups="all").fp8_groups == ("all",)
    with pytest.raises(ConfigError, match="model.fp8 = 'rowwise'"):
        config.replace(fp8="rowwise")
