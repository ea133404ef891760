"""The DeepSpeed engine around a WeatherMixer on its mesh: one builder for training and benchmarks.

``deepspeed.initialize`` with the mesh's groups (:class:`DeepSpeedMPU`: model = domain x tensor,
data = the replica group), and two corrections where DeepSpeed hands the step to the client
optimizer (ZeRO stage 0 with fp32 or autocast weights); ZeRO stages 1-2 and DeepSpeed's bf16
optimizer keep their own gradient handling (the gain of each: ``benchmarks/GPU.md``):

* **no gradient reduction when there is one replica**: DeepSpeed's buffered fallback would
  flatten, scale, all-reduce and copy back every gradient, unchanged. The model-parallel
  gradients are complete after backward (each layer's collectives sum them over its groups).
* **gradient clipping inside the fused optimizer step** (:class:`ClipInStep`): torch's fused
  Adam/AdamW take the clip factor as their ``grad_scale`` and divide each gradient in the
  update kernel, so clipping costs one multi-tensor norm.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

from parallel.mesh import MeshError, ProcessMesh
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
    the next step.
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
    mark_model_parallel(model, mesh)
    mpu = DeepSpeedMPU(mesh) if "model" in mesh.groups else None  # the serial mesh has no groups
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                              lr_scheduler=lr_scheduler, config=config, mpu=mpu)
    engine.clip_in_step = ClipInStep(optimizer, model, mesh, max_norm) if clip_in_step else None
    if stage == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False
    return engine, optimizer, lr_scheduler


def mark_model_parallel(model: torch.nn.Module, mesh: ProcessMesh) -> None:
    """Set DeepSpeed's ``tensor_model_parallel`` flag on every sharded parameter.

    DeepSpeed counts a flagged parameter on every model-parallel rank in the gradient norm and
    an unflagged one on model rank 0 only; every element of ours lives on exactly one rank of
    the model group, so with more than one model rank every parameter is flagged."""
    for param in model.parameters():
        param.tensor_model_parallel = mesh.config.model_size > 1


class DeepSpeedMPU:
    """The ``mpu`` object ``deepspeed.initialize`` takes: model = domain x tensor, data = replica.

    DeepSpeed all-reduces gradient norms over the model-parallel group and counts a
    parameter on every model-parallel rank when ``param.tensor_model_parallel`` is set; our
    parameters are all sharded over the whole model group, so every one carries the flag.
    DeepSpeed's "tensor" model parallelism is therefore our whole model group, and there is
    no pipeline axis.
    """

    def __init__(self, mesh: ProcessMesh):
        if "model" not in mesh.groups:
            raise MeshError("DeepSpeedMPU needs a mesh built over torch.distributed (ProcessMesh.build); "
                            "the serial mesh has no process groups: pass mpu=None to deepspeed.initialize")
        self.mesh = mesh

    def get_model_parallel_group(self):
        return self.mesh.groups["model"]

    def get_model_parallel_rank(self) -> int:
        return self.mesh.model_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.config.model_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of model rank 0 in this rank's model group."""
        return dist.get_global_rank(self.mesh.groups["model"], 0)

    def get_data_parallel_group(self):
        return self.mesh.groups["replica"]

    def get_data_parallel_rank(self) -> int:
        return self.mesh.replica_rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.replicas

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.mesh.groups["replica"])

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    # DeepSpeed also asks for these names in some code paths
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
