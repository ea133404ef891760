"""The optimizer's mesh-free state round-trips through every optimizer a run can use.

On two replicas (data 2): train, read the state (master weights, moments, step counts), write it
into a freshly built engine with other initial weights, train both on: the same parameters,
bitwise, for ZeRO 0/1/2 in float32, DeepSpeed's bf16 optimizer at ZeRO 0 and 1, and the
master-weight optimizer; and across optimizers (ZeRO 2 -> ZeRO 0, ZeRO 0 -> ZeRO 1) to float32
rounding. DeepSpeed cannot all-reduce float64 gradients: float32 throughout.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import spawn
from weathermixer.config import preset

CONFIG = preset("tiny", dropout=0.0)
FLOAT32 = {"bf16": {"enabled": False}}
VARIANTS = {
    "zero0": (0, FLOAT32, False), "zero1": (1, FLOAT32, False), "zero2": (2, FLOAT32, False),
    "zero0-bf16": (0, {"bf16": {"enabled": True}}, False), "zero1-bf16": (1, {"bf16": {"enabled": True}}, False),
    "master-weights": (0, FLOAT32, True),
}


def build(variant: str, mesh, seed: int):
    from launch.training.engine import initialize_engine
    from launch.training.master_weights import MasterWeightAdam
    from weathermixer.model import WeatherMixer

    stage, precision, master = VARIANTS[variant]
    model = WeatherMixer(CONFIG, mesh, seed=seed)
    groups = model.optimizer_groups(3e-3, 1e-3, 0.01)
    optimizer = (MasterWeightAdam(groups, lr=3e-3, decoupled_weight_decay=True) if master
                 else torch.optim.AdamW(groups, lr=3e-3, fused=True))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.05,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, **precision}
    engine, wrapper, _ = initialize_engine(model, optimizer, config, mesh)
    engine.wrapper = wrapper
    dtype = torch.bfloat16 if master or precision["bf16"]["enabled"] else torch.float32
    return engine, optimizer, dtype


def train(engine, dtype, steps, rank):
    for step in steps:
        generator = torch.Generator().manual_seed(100 * step + rank)
        lat, lon = CONFIG.model_lat, CONFIG.model_lon

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(dtype)

        state, static = draw(1, lat, lon, CONFIG.in_channels), draw(lat, lon, CONFIG.static_channels)
        forcings, target = draw(1, lat, lon, CONFIG.forcing_channels), draw(1, lat, lon, CONFIG.out_channels)
        engine.backward((engine(state, static, forcings).float() - target.float()).square().mean())
        engine.step()


def round_trip(rank, world_size, pairs):
    import deepspeed

    from launch.training.optimizer_state import OptimizerState
    from parallel.mesh import MeshConfig, ProcessMesh

    deepspeed.init_distributed(dist_backend="gloo")
    mesh = ProcessMesh.build(MeshConfig(data=world_size))
    out = []
    for source, target in pairs:
        engine, optimizer, dtype = build(source, mesh, seed=3)
        train(engine, dtype, range(3), rank)
        values, steps = OptimizerState(engine.module, optimizer, engine.wrapper).read()
        resumed, resumed_optimizer, resumed_dtype = build(target, mesh, seed=4)  # other initial weights
        with torch.no_grad():
            for name, param in resumed.module.named_parameters():
                param.copy_(values[name]["master"])
        OptimizerState(resumed.module, resumed_optimizer, resumed.wrapper).write(values, steps)
        train(engine, dtype, range(3, 5), rank)
        train(resumed, resumed_dtype, range(3, 5), rank)
        after, after_steps = OptimizerState(engine.module, optimizer, engine.wrapper).read()
        again, again_steps = OptimizerState(resumed.module, resumed_optimizer, resumed.wrapper).read()
        # per quantity over the whole model (a gradient that is zero in exact arithmetic, such as a
        # bias before a LayerNorm, turns rounding into full-size Adam steps of its own)
        error = max(float(torch.cat([(again[n][k] - after[n][k]).flatten() for n in after]).norm()
                          / torch.cat([after[n][k].flatten() for n in after]).norm()) for k in after[next(iter(after))])
        moved = max(float((after[n]["exp_avg"] - values[n]["exp_avg"]).abs().max()) for n in after)
        out.append(dict(steps=steps, after_steps=after_steps, again_steps=again_steps, error=error, moved=moved,
                        nonzero=all(float(values[n]["exp_avg_sq"].abs().max()) > 0 for n in values)))
    return out


@pytest.mark.parametrize("pairs", [
    [("zero0", "zero0"), ("zero1", "zero1"), ("zero2", "zero2")],
    [("zero0-bf16", "zero0-bf16"), ("zero1-bf16", "zero1-bf16"), ("master-weights", "master-weights")],
], ids=["float32", "bf16"])
def test_state_written_into_a_fresh_engine_continues_bitwise(pairs):
    for rank_results in spawn(round_trip, 2, pairs):
        for (source, _), result in zip(pairs, rank_results):
            # (DeepSpeed's unfused bf16 wrapper counts one step more: a zero-gradient step at its start)
            (steps,) = set(result["steps"])
            expected = [steps + 2] * len(result["steps"])
            assert steps >= 3 and result["after_steps"] == result["again_steps"] == expected, (source, result)
            assert result["nonzero"] and result["moved"] > 0, (source, result)  # moments were there and moved
            assert result["error"] == 0, (source, result)


def test_state_moves_between_zero_stages():
    pairs = [("zero2", "zero0"), ("zero0", "zero1")]
    for rank_results in spawn(round_trip, 2, pairs):
        for pair, result in zip(pairs, rank_results):
            assert result["after_steps"] == result["again_steps"], (pair, result)
            assert result["error"] < 1e-5, (pair, result)
