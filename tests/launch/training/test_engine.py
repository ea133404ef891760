"""The engine builder's two changes to DeepSpeed's ZeRO-0 step give the plain PyTorch step.

Clipping inside the fused optimizer step must equal ``clip_grad_norm_`` followed by the
step, skip the update on a non-finite norm, and leave DeepSpeed's own handling in place
where DeepSpeed owns the optimizer (bf16, ZeRO 1-2); the one-replica gradient reduction is
off only where it is a no-op; DeepSpeed's device-synchronising throughput timer is off.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import spawn
from weathermixer.config import preset
from weathermixer.model import WeatherMixer

CONFIG = preset("tiny", dropout=0.0)
MAX_NORM = 0.05  # below the tiny model's gradient norms: every step clips


def deepspeed_config(stage: int = 0, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": MAX_NORM,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, **extra}


def batch(step: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(step)
    lat, lon = CONFIG.model_lat, CONFIG.model_lon

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return (draw(2, lat, lon, CONFIG.in_channels), draw(lat, lon, CONFIG.static_channels),
            draw(2, lat, lon, CONFIG.forcing_channels), draw(2, lat, lon, CONFIG.out_channels))


def loss_of(model, state, static, forcings, target):
    return (model(state, static, forcings) - target).square().mean()


def engine_worker(rank, world_size, stage, extra, dtype=torch.float64):
    import deepspeed

    from launch.training.engine import initialize_engine
    from parallel.mesh import MeshConfig, ProcessMesh

    deepspeed.init_distributed(dist_backend="gloo")
    mesh = ProcessMesh.build(MeshConfig(data=world_size)) if world_size > 1 else ProcessMesh.serial()
    # float64 where it can: Adam turns rounding in near-zero gradients into whole updates
    model = WeatherMixer(CONFIG, seed=3).to(dtype)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    engine, engine_optimizer, _ = initialize_engine(model, optimizer, deepspeed_config(stage, **extra), mesh)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)

    norms, reference_norms = [], []
    for step in range(3):
        state, static, forcings, target = batch(step, dtype)
        engine.backward(loss_of(engine, state, static, forcings, target))
        engine.step()
        if engine.clip_in_step is not None:
            norms.append(float(engine.clip_in_step.last_norm))
        reference_optimizer.zero_grad()
        loss_of(reference, state, static, forcings, target).backward()
        reference_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)))
        reference_optimizer.step()
    error = max(float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp(min=1e-12))
                for a, b in zip(model.parameters(), reference.parameters()))

    skipped = None
    if engine.clip_in_step is not None:  # a non-finite gradient: no update, no step counted
        before = [p.detach().clone() for p in model.parameters()]
        steps = [int(engine_optimizer.state[p]["step"]) for p in model.parameters()]
        state, static, forcings, target = batch(9, dtype)
        engine.backward(loss_of(engine, state, static, forcings, target))
        next(model.parameters()).grad[0].fill_(float("nan"))
        engine.step()
        skipped = (all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters())),
                   steps == [int(engine_optimizer.state[p]["step"]) for p in model.parameters()],
                   float(engine.clip_in_step.last_norm))
    return dict(clip_in_step=engine.clip_in_step is not None, reduces=engine.enable_backward_allreduce,
                throughput_timer=engine.tput_timer.config.enabled,
                error=error, norms=norms, reference_norms=reference_norms, skipped=skipped,
                parameters=[p.detach().double().numpy() for p in model.parameters()])  # by value


@pytest.fixture(scope="module")
def zero0_run() -> dict:
    (result,) = spawn(engine_worker, 1, 0, {})
    return result


def test_clipping_in_the_fused_step_equals_clip_grad_norm_then_step(zero0_run):
    assert zero0_run["clip_in_step"] and not zero0_run["reduces"], zero0_run
    assert not zero0_run["throughput_timer"]  # it would synchronise the device every step
    assert min(zero0_run["reference_norms"]) > MAX_NORM, f"no step clipped: {zero0_run['reference_norms']}"
    assert zero0_run["norms"] == pytest.approx(zero0_run["reference_norms"], rel=1e-5)
    assert zero0_run["error"] < 1e-6, zero0_run  # the clip factor reaches the kernel in float32


def test_deepspeeds_synchronising_throughput_timer_is_off_unless_the_config_asks():
    (result,) = spawn(engine_worker, 1, 0, {"timers": {"throughput": {"enabled": True}}})
    assert result["throughput_timer"] and result["clip_in_step"], result


def test_a_non_finite_gradient_norm_skips_the_update(zero0_run):
    unchanged, steps_unchanged, norm = zero0_run["skipped"]
    assert unchanged and steps_unchanged and norm != norm, zero0_run["skipped"]


def test_the_skipped_one_replica_reduction_is_a_no_op():
    """DeepSpeed cannot reduce float64 gradients, so float32: two replicas of the same batch
    reduce (a mean of equal gradients) and end where one replica that skips it ends."""
    (single,) = spawn(engine_worker, 1, 0, {}, torch.float32)
    replicas = spawn(engine_worker, 2, 0, {}, torch.float32)
    assert not single["reduces"] and all(r["reduces"] and r["clip_in_step"] for r in replicas)
    for result in replicas:
        for a, b in zip(result["parameters"], single["parameters"]):
            assert (a == b).all()


@pytest.mark.parametrize("stage, extra", [(1, {}), (0, {"bf16": {"enabled": True}})])
def test_deepspeed_keeps_its_clipping_where_it_owns_the_optimizer(stage, extra):
    (result,) = spawn(engine_worker, 1, stage, extra)
    assert not result["clip_in_step"], result
    if stage == 1:  # DeepSpeed's clipping and step equal the plain ones too (its norm is float32)
        assert result["error"] < 1e-5, result


# --- DeepSpeed's mpu adapter -------------------------------------------------------------------
MPU_MESHES = [dict(data=2, tensor=2), dict(data=2, domain=(1, 2)), dict(sample=2, domain=(2, 1)),
              dict(domain=(2, 1), tensor=2)]


def describe_mpu(rank, world_size):
    import torch.distributed as dist

    from launch.training.engine import DeepSpeedMPU
    from parallel.mesh import MeshConfig, ProcessMesh

    out = []
    for options in MPU_MESHES:
        mesh = ProcessMesh.build(MeshConfig(**options))
        mpu = DeepSpeedMPU(mesh)
        out.append(dict(
            model=dist.get_process_group_ranks(mesh.groups["model"]),
            replica=dist.get_process_group_ranks(mesh.groups["replica"]),
            model_rank=mesh.model_rank, replica_rank=mesh.replica_rank, model_size=mesh.config.model_size,
            replicas=mesh.replicas,
            mpu_model=dist.get_process_group_ranks(mpu.get_model_parallel_group()),
            mpu_data=dist.get_process_group_ranks(mpu.get_data_parallel_group()),
            data_ranks=mpu.get_data_parallel_group_ranks(),
            ranks=(mpu.get_model_parallel_rank(), mpu.get_tensor_model_parallel_rank(), mpu.get_data_parallel_rank()),
            sizes=(mpu.get_model_parallel_world_size(), mpu.get_tensor_model_parallel_world_size(),
                   mpu.get_data_parallel_world_size()),
            src_rank=mpu.get_tensor_model_parallel_src_rank(),
            pipeline=(mpu.get_pipeline_model_parallel_world_size(), mpu.get_pipeline_model_parallel_rank())))
    return out


def test_mpu_exposes_the_model_group_as_model_parallel_and_the_replicas_as_data_parallel():
    for got in (m for meshes in spawn(describe_mpu, 4) for m in meshes):
        assert got["mpu_model"] == got["model"], got
        assert got["mpu_data"] == got["data_ranks"] == got["replica"], got
        assert got["ranks"] == (got["model_rank"], got["model_rank"], got["replica_rank"])
        assert got["sizes"] == (got["model_size"], got["model_size"], got["replicas"])
        assert got["src_rank"] == got["model"][0] and got["pipeline"] == (1, 0)


def test_mpu_refuses_the_serial_mesh():
    from launch.training.engine import DeepSpeedMPU
    from parallel.mesh import MeshError, ProcessMesh

    with pytest.raises(MeshError, match="serial mesh has no process groups"):
        DeepSpeedMPU(ProcessMesh.serial())
