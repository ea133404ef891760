"""The DeepSpeed engine around a WeatherMixer on its mesh: one builder for training and benchmarks.

``deepspeed.initialize`` with the mesh's groups (``DeepSpeedMPU``: model = domain x tensor,
data = the replica group), and two corrections where DeepSpeed hands the step to the
client optimizer (ZeRO stage 0 with fp32 or autocast weights); ZeRO stages 1-2 and
DeepSpeed's bf16 optimizer keep their own gradient handling. Each is worth ~3-10 ms a step
for ``jigsaw-1b`` on one H100 (``benchmarks/GPU.md``):

* **no gradient reduction when there is one replica.** DeepSpeed's engine reduces the
  gradients after every backward with its buffered fallback: it flattens them into buckets,
  scales by 1 / replicas, all-reduces and copies back - four passes over every gradient that
  leave it unchanged with one replica (one GPU, or a mesh that is all model parallel). The
  model-parallel gradients are complete after backward (each layer's collectives sum them
  over its groups), so nothing else needs reducing.
* **gradient clipping inside the fused optimizer step** (:class:`ClipInStep`). DeepSpeed
  clips with one norm kernel and one in-place multiply per parameter; torch's fused
  Adam/AdamW take the clip factor as their ``grad_scale`` (the hook ``GradScaler`` uses) and
  divide each gradient in the update kernel, so clipping costs one multi-tensor norm. The
  same ``found_inf`` input skips the update when the norm is not finite.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from parallel.mesh import DeepSpeedMPU, ProcessMesh
from parallel.sharding import global_grad_norm


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step divides the gradients by its ``grad_scale`` (torch's fused
    Adam/AdamW/SGD, the hook ``GradScaler`` uses)."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


class ClipInStep:
    """Clip the global gradient norm to ``max_norm`` inside a fused torch optimizer's step.

    A step pre-hook computes the norm over the whole mesh (:func:`global_grad_norm`) and sets
    the optimizer's ``grad_scale`` to ``max(1, (norm + 1e-6) / max_norm)`` - the update then
    uses ``grad * min(1, max_norm / (norm + 1e-6))``, DeepSpeed's and torch's clipping - and
    ``found_inf`` to whether the norm is not finite (the update is skipped, the step count
    too). ``last_norm`` holds the last norm (a device tensor).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, mesh: ProcessMesh | None,
                 max_norm: float):
        if not takes_grad_scale(optimizer):
            raise ValueError(f"ClipInStep needs a fused torch optimizer (Adam/AdamW/SGD with fused=True), got "
                             f"{type(optimizer).__name__} with fused={optimizer.defaults.get('fused')}")
        if not max_norm > 0:
            raise ValueError(f"ClipInStep: max_norm must be positive, got {max_norm}")
        self.model, self.mesh, self.max_norm = model, mesh, float(max_norm)
        self.last_norm: torch.Tensor | None = None
        self.handle = optimizer.register_step_pre_hook(self._before_step)

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        norm = global_grad_norm(self.model, self.mesh).float()
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.last_norm = norm


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
                      mesh: ProcessMesh, lr_scheduler=None):
    """``(engine, optimizer, lr_scheduler)`` from ``deepspeed.initialize`` for ``model`` on ``mesh``.

    With ZeRO stage 0, no DeepSpeed fp16/bf16 optimizer, gradient clipping on and a fused
    torch optimizer, the clipping moves into the optimizer step (``engine.clip_in_step``,
    else None); with one replica, the engine's no-op gradient reduction is switched off.
    DeepSpeed's throughput timer is off unless the config's ``timers`` section turns it on: it
    synchronises the device in every forward and step, so the GPU idles while the host launches
    the next step (~1 ms a step of ``jigsaw-1b`` on one H100, ``benchmarks/GPU.md``).
    """
    import deepspeed

    config = copy.deepcopy(config)
    config.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    deepspeed_precision = any(config.get(key, {}).get("enabled", False) for key in ("bf16", "bfloat16", "fp16"))
    autocast = config.get("torch_autocast", {})
    fp16_autocast = autocast.get("enabled", False) and "bfloat16" not in str(autocast.get("dtype", "bfloat16"))
    max_norm = float(config.get("gradient_clipping", 0.0))
    clip_in_step = (stage == 0 and not deepspeed_precision and not fp16_autocast and max_norm > 0
                    and takes_grad_scale(optimizer))
    if clip_in_step:
        config["gradient_clipping"] = 0.0
    mpu = DeepSpeedMPU(mesh) if "model" in mesh.groups else None  # the serial mesh has no groups
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                              lr_scheduler=lr_scheduler, config=config, mpu=mpu)
    engine.clip_in_step = ClipInStep(optimizer, model, mesh, max_norm) if clip_in_step else None
    if stage == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine, optimizer, lr_scheduler


def release_shared_memory() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment from ``/dev/shm``.

    On CPU, DeepSpeed's shared-memory collectives give every rank a ~66 MB POSIX shared-memory
    segment (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlink it:
    each run would leave its segments in memory until the machine restarts. Call it after the
    last collective (the ranks mapped each other's segments at start-up; unlinking removes the
    name only). Nothing to do on GPUs.
    """
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")])
    (Path("/dev/shm") / name).unlink(missing_ok=True)
