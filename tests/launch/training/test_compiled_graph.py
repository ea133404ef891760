"""What the compiled Bayesian step keeps for backward.

The sample's graph is traced on meta tensors (no memory, no device) through AOTAutograd with
inductor's decompositions and the min-cut partitioner that ``torch.compile`` uses, and the tensors
its forward hands to its backward are listed: a float32 copy of every weight's ``sigma`` among
them would cost 4 bytes a parameter of memory and a write and a read of them every step.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

from launch.training.step import TrainingStep
from weathermixer.config import ModelConfig
from weathermixer.model import WeatherMixer

CONFIG = ModelConfig(lat=8, lon=16, in_channels=3, out_channels=3, static_channels=1, forcing_channels=2,
                     patch=(1, 4), hidden=48, depth=2, token_fraction=0.5, bayesian=("all",))


def saved_for_backward(function, *inputs) -> list[torch.Tensor]:
    """The tensors (not inputs) that the compiled forward of ``function(*inputs)`` saves for backward."""
    saved: list[torch.Tensor] = []

    def forward_compiler(graph_module, _):
        outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
        saved.extend(node.meta["val"] for node in outputs if node is not None and node.op != "placeholder"
                     and isinstance(node.meta.get("val"), torch.Tensor))
        return graph_module

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda graph_module, _: graph_module,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch._dynamo.reset()
    torch.compile(function, backend=backend, dynamic=False)(*inputs)
    return saved


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

    saved = saved_for_backward(sample_forward, state, static, forcings)
    weight_shapes = {tuple(p.shape) for name, p in model.named_parameters() if name.endswith("_rho")}
    float32_weights = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and tuple(t.shape) in weight_shapes]
    assert saved, "nothing traced"
    assert not float32_weights, f"float32 copies of weights kept for backward: {float32_weights}"
