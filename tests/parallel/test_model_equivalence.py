"""The whole WeatherMixer on a mesh equals the serial model: outputs and every gradient."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, compare_gradients, copy_into, relative_error
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer

CONFIG = ModelConfig(lat=9, lon=16, in_channels=5, out_channels=5, static_channels=2, forcing_channels=2,
                     patch=(1, 4), hidden=8, depth=2, token_fraction=0.5)
VARIANTS = {
    "linear-residual": dict(mode="autoregressive"),
    "add-residual-latent": dict(config=dict(residual="add", decoder_skip=False, latent_steps=2), mode="latent"),
    "checkpointed-2d-patch": dict(config=dict(patch=(2, 2), activation_checkpointing=True, lat=10),
                                  mode="autoregressive"),
    # the mesh model's rollout traced whole (fullgraph: a graph break at a collective fails);
    # tracing is slow on CPU, so one block (it holds every kind of collective) on the mesh with
    # domain, tensor and all-to-all collectives only
    "compiled": dict(config=dict(depth=1), mode="autoregressive", compiled=True, meshes=[((1, 2), 2)]),
    # every linear layer Bayesian: one weight draw, held for the rollout with its KL divergence
    # (WeatherMixer.draw_sample, as training draws), and the KL in the objective
    "bayesian": dict(config=dict(bayesian=("all",), init_sigma=0.05), mode="autoregressive", draw=(5, 2)),
    # FP8 mixing layers and FP8 gradient products of the embedding and decoder (the defaults;
    # tests/parallel/test_fp8.py says why the float32 tolerance holds)
    "fp8": dict(config=dict(fp8="tensorwise"), mode="autoregressive"),
}


def run_model(rank, world_size, meshes, dtype, variants):
    torch.manual_seed(0)
    errors = []
    for variant in variants:
        spec = VARIANTS[variant]
        config = CONFIG.replace(**spec.get("config", {}))
        serial = WeatherMixer(config, seed=1).to(dtype)
        lat, lon = config.model_lat, config.model_lon
        generator = torch.Generator().manual_seed(7)
        state = torch.randn(2, lat, lon, config.in_channels, generator=generator, dtype=dtype)
        static = torch.randn(lat, lon, config.static_channels, generator=generator, dtype=dtype)
        forcings = torch.randn(2, 2, lat, lon, config.forcing_channels, generator=generator, dtype=dtype)
        weights = torch.randn(2, 2, lat, lon, config.out_channels, generator=generator, dtype=dtype)
        serial.zero_grad()
        if "draw" in spec:
            serial.draw_weights(*spec["draw"])
        kl = serial.draw_sample()
        expected = serial.rollout(state, static, forcings, 2, spec["mode"])
        ((expected * weights).sum() + kl).backward()
        for domain, tensor in meshes:
            if "meshes" in spec and (domain, tensor) not in spec["meshes"]:
                continue
            # another initialisation seed, overwritten by the serial weights; the weight noise is
            # keyed by the seed too, so a Bayesian model shares the serial model's
            model = WeatherMixer(config, build_mesh(domain, tensor), seed=1 if "draw" in spec else 3).to(dtype)
            copy_into(model, serial)
            (lat0, lat1), (lon0, lon1) = model.layers.tile_bounds()
            t = model.mesh.tensor_rank
            pick = lambda x, part: x[..., lat0:lat1, lon0:lon1, :][..., part.indices[t]]  # noqa: E731
            static_part = model.layers.channels(config.static_channels)
            forcing_part = model.layers.channels(config.forcing_channels)
            if "draw" in spec:
                model.draw_weights(*spec["draw"])
            kl = model.draw_sample()
            rollout = model.rollout
            if spec.get("compiled"):
                rollout = torch.compile(rollout, fullgraph=True, backend="aot_eager", dynamic=False)
            out = rollout(pick(state, model.state_channels), pick(static, static_part),
                          pick(forcings, forcing_part), 2, spec["mode"])
            ((out * pick(weights, model.out_channels)).sum() + kl).backward()
            output_error = relative_error(out, pick(expected, model.out_channels).detach())
            gradient_errors = compare_gradients(model, serial)
            worst = max(gradient_errors, key=gradient_errors.get)
            errors.append((variant, domain, tensor, output_error, worst, gradient_errors[worst]))
    return errors


MESHES = {2: [((1, 1), 2), ((2, 1), 1), ((1, 2), 1)],
          4: [((2, 1), 2), ((1, 2), 2), ((2, 2), 1), ((4, 1), 1), ((1, 1), 4)]}
DTYPES = {torch.float64: [v for v in VARIANTS if v != "fp8"], torch.float32: ["linear-residual", "fp8"]}


def run_all(rank, world_size, meshes):
    return {dtype: run_model(rank, world_size, meshes, dtype, variants) for dtype, variants in DTYPES.items()}


@functools.cache
def run(world_size: int):
    """One spawn per world size serves both dtypes (starting processes is the cost)."""
    return spawn(run_all, world_size, MESHES[world_size])


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_model_matches_serial(world_size, dtype, tolerance):
    for rank_results in run(world_size):
        rank_errors = rank_results[dtype]
        assert len(rank_errors) == sum(len([m for m in MESHES[world_size] if m in VARIANTS[v].get("meshes", [m])])
                                       for v in DTYPES[dtype])
        for variant, domain, tensor, output_error, worst, gradient_error in rank_errors:
            where = f"{variant}, domain {domain[0]}x{domain[1]}, tensor {tensor}"
            assert output_error <= tolerance, f"{where}: output relative error {output_error:.2e}"
            assert gradient_error <= tolerance, f"{where}: gradient of {worst} relative error {gradient_error:.2e}"
