"""Training on a mesh follows the serial run: 20 Adam steps of the WeatherMixer give the serial
loss curve, and the global gradient norm (ours and DeepSpeed's, through the mpu adapter) is
the serial one at every step.

Meshes on 4 ranks: domain 2x1 x tensor 2 (one replica, uneven latitude tiles), and
data 2 x tensor 2 (two replicas on different halves of the batch, gradients averaged).
Gradients are clipped at a norm the run crosses, so clipping follows the global norm too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from launch.training.engine import DeepSpeedMPU, mark_model_parallel
from parallel.mesh import MeshConfig, ProcessMesh
from parallel.reduce import average_gradients, global_mean
from parallel.sharding import global_grad_norm, load_full_state
from tests.distributed import spawn
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer

CONFIG = ModelConfig(lat=9, lon=16, in_channels=5, out_channels=5, static_channels=2, forcing_channels=2,
                     patch=(1, 4), hidden=8, depth=2, token_fraction=0.5)
STEPS, BATCH, LEARNING_RATE, MAX_NORM = 20, 4, 3e-3, 0.5
MESHES = [MeshConfig(domain=(2, 1), tensor=2), MeshConfig(data=2, tensor=2)]
REPO = Path(__file__).resolve().parents[3]


def batch(step: int):
    """The global batch of one step: state, static fields, forcings, target (float64)."""
    generator = torch.Generator().manual_seed(1000 + step)
    lat, lon = CONFIG.model_lat, CONFIG.model_lon
    state = torch.randn(BATCH, lat, lon, CONFIG.in_channels, generator=generator, dtype=torch.float64)
    static = torch.randn(lat, lon, CONFIG.static_channels, generator=generator, dtype=torch.float64)
    forcings = torch.randn(BATCH, lat, lon, CONFIG.forcing_channels, generator=generator, dtype=torch.float64)
    target = state.roll(1, dims=2) + 0.1 * torch.randn(state.shape, generator=generator, dtype=torch.float64)
    return state, static, forcings, target


def train_serial(initial: dict[str, torch.Tensor]):
    model = WeatherMixer(CONFIG).double()
    load_full_state(model, initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    losses, norms = [], []
    for step in range(STEPS):
        state, static, forcings, target = batch(step)
        loss = (model(state, static, forcings) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, norms


def replica_mean(value: torch.Tensor, mesh: ProcessMesh) -> torch.Tensor:
    """The serial loss is the mean of the replicas' losses (equal shares of the batch)."""
    if mesh.replica_group is None:
        return value
    total = value.clone()
    torch.distributed.all_reduce(total, group=mesh.replica_group)
    return total / mesh.replicas


def train_parallel(config: MeshConfig, initial: dict[str, torch.Tensor]):
    from deepspeed.runtime.utils import clip_grad_norm_

    mesh = ProcessMesh.build(config)
    model = WeatherMixer(CONFIG, mesh).double()
    load_full_state(model, initial)
    mark_model_parallel(model, mesh)
    mpu = DeepSpeedMPU(mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    (lat0, lat1), (lon0, lon1) = model.layers.tile_bounds()
    t = mesh.tensor_rank
    per_replica = BATCH // mesh.replicas
    samples = slice(mesh.replica_rank * per_replica, (mesh.replica_rank + 1) * per_replica)

    def block(x, channels, batched=True):
        x = x[samples] if batched else x
        return x[..., lat0:lat1, lon0:lon1, :][..., channels.indices[t]]

    losses, norms, deepspeed_norms = [], [], []
    for step in range(STEPS):
        state, static, forcings, target = batch(step)
        prediction = model(block(state, model.state_channels),
                           block(static, model.layers.channels(CONFIG.static_channels), batched=False),
                           block(forcings, model.layers.channels(CONFIG.forcing_channels)))
        loss = global_mean((prediction - block(target, model.out_channels)).square(), mesh)
        optimizer.zero_grad()
        loss.backward()
        average_gradients(model, mesh)
        norm = global_grad_norm(model, mesh)
        # DeepSpeed's clipping with a bound it never reaches: only its norm is used
        deepspeed_norms.append(float(clip_grad_norm_(list(model.parameters()), 1e30, mpu=mpu)))
        with torch.no_grad():  # the formula of torch.nn.utils.clip_grad_norm_
            for param in model.parameters():
                param.grad *= torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0)
        optimizer.step()
        losses.append(float(replica_mean(loss.detach(), mesh)))
        norms.append(float(norm))
    return losses, norms, deepspeed_norms


def worker(rank, world_size, initial):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # its clip_grad_norm_ talks through deepspeed.comm
    return [train_parallel(config, initial) for config in MESHES]


def test_training_follows_serial_loss_curve_and_gradient_norm():
    initial = {k: v.detach() for k, v in WeatherMixer(CONFIG, seed=11).double().named_parameters()}
    serial_losses, serial_norms = train_serial(initial)
    assert serial_losses[-1] < 0.8 * serial_losses[0], f"the serial run does not learn: {serial_losses}"
    assert any(n > MAX_NORM for n in serial_norms), f"no step was clipped (norms {serial_norms})"
    for rank, runs in enumerate(spawn(worker, 4, initial)):
        for config, (losses, norms, deepspeed_norms) in zip(MESHES, runs):
            where = f"rank {rank}, {config}"
            for step in range(STEPS):
                assert abs(losses[step] - serial_losses[step]) <= 1e-10 * serial_losses[step], \
                    f"{where}: step {step} loss {losses[step]!r} vs serial {serial_losses[step]!r}"
                assert abs(norms[step] - serial_norms[step]) <= 1e-10 * serial_norms[step], \
                    f"{where}: step {step} gradient norm {norms[step]!r} vs serial {serial_norms[step]!r}"
                # DeepSpeed sums per-parameter norms in float32
                assert abs(deepspeed_norms[step] - serial_norms[step]) <= 1e-6 * serial_norms[step], \
                    f"{where}: step {step} DeepSpeed gradient norm {deepspeed_norms[step]!r} vs serial " \
                    f"{serial_norms[step]!r}"
