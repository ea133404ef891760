"""What the compiled Bayesian step keeps for backward.

The sample's graph is traced on meta tensors (no memory, no device) as ``torch.compile``
partitions it, and the tensors its forward hands to its backward are listed: a float32 copy of
every weight's ``sigma`` among them would cost 4 bytes a parameter of memory and a write and a
read of them every step.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from launch.runtime.compile import saved_for_backward
from launch.training.step import TrainingStep
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer

CONFIG = ModelConfig(lat=8, lon=16, in_channels=3, out_channels=3, static_channels=1, forcing_channels=2,
                     patch=(1, 4), hidden=48, depth=2, token_fraction=0.5, bayesian=("all",))


def test_the_bayesian_step_keeps_no_float32_copy_of_the_weights():
    with torch.device("meta"):
        model = WeatherMixer(CONFIG).to(torch.bfloat16)
        state = torch.empty(1, CONFIG.model_lat, CONFIG.model_lon, CONFIG.in_channels, dtype=torch.bfloat16)
        static = torch.empty(CONFIG.model_lat, CONFIG.model_lon, CONFIG.static_channels, dtype=torch.bfloat16)
        forcings = torch.empty(1, 1, CONFIG.model_lat, CONFIG.model_lon, CONFIG.forcing_channels, dtype=torch.bfloat16)
    model.draw_weights(0, 0)
    step = SimpleNamespace(model=model, run=SimpleNamespace(training=SimpleNamespace(rollout_mode="autoregressive")))

    def sample_forward(state, static, forcings):
        return TrainingStep._sample_forward(step, state, static, forcings, 1)

    prediction, kl, *saved = saved_for_backward(sample_forward, state, static, forcings)
    weight_shapes = {tuple(p.shape) for name, p in model.named_parameters() if name.endswith("_rho")}
    float32_weights = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and tuple(t.shape) in weight_shapes]
    assert saved, "nothing traced"
    assert not float32_weights, f"float32 copies of weights kept for backward: {float32_weights}"


def test_the_compiled_sample_equals_the_eager_one_with_checkpointed_blocks():
    """The sample's weights drawn once and held for a rollout of checkpointed blocks: traced in
    one graph (no break at the held weights' reads inside the checkpointed blocks), equal to the
    eager step in outputs, KL and every gradient."""
    config = CONFIG.replace(activation_checkpointing=True, depth=1, init_sigma=0.1)
    generator = torch.Generator().manual_seed(0)
    lat, lon = config.model_lat, config.model_lon
    state = torch.randn(1, lat, lon, config.in_channels, generator=generator)
    static = torch.randn(lat, lon, config.static_channels, generator=generator)
    forcings = torch.randn(1, 2, lat, lon, config.forcing_channels, generator=generator)
    results = []
    for compiled in (False, True):
        model = WeatherMixer(config, seed=1)
        step = SimpleNamespace(model=model, run=SimpleNamespace(training=SimpleNamespace(rollout_mode="autoregressive")))

        def sample_forward(state, static, forcings):
            return TrainingStep._sample_forward(step, state, static, forcings, 2)

        if compiled:
            torch._dynamo.reset()
            sample_forward = torch.compile(sample_forward, fullgraph=True, backend="aot_eager", dynamic=False)
        model.draw_weights(4, 0)
        prediction, kl = sample_forward(state, static, forcings)
        ((prediction**2).sum() + kl).backward()
        results.append((prediction.detach(), kl.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_kl, eager_grads), (traced, traced_kl, traced_grads) = results
    assert torch.allclose(traced, eager, rtol=1e-5, atol=1e-6) and torch.allclose(traced_kl, eager_kl, rtol=1e-6)
    for name, grad in eager_grads.items():
        assert torch.allclose(traced_grads[name], grad, rtol=1e-4, atol=1e-6), name
