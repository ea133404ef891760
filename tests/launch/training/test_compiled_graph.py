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
        return TrainingStep._sample_forward(step, state, static, forcings, 1, with_kl=True)

    prediction, kl, *saved = saved_for_backward(sample_forward, state, static, forcings)
    weight_shapes = {tuple(p.shape) for name, p in model.named_parameters() if name.endswith("_rho")}
    float32_weights = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and tuple(t.shape) in weight_shapes]
    assert saved, "nothing traced"
    assert not float32_weights, f"float32 copies of weights kept for backward: {float32_weights}"
