"""Reductions of a tile tensor to one number for the whole replica (losses, metrics).

Each rank of the model group holds one block (its tile, its channel slice) of a global
tensor; the loss is a function of all blocks. The sum is reduced over the model group with
:func:`parallel.comm.reduce_from_group`, so every rank gets the serial value and the serial
gradient of its own block (not ``model_size`` times it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import all_reduce_sum, reduce_from_group
from parallel.mesh import ProcessMesh


def global_sum(x: torch.Tensor, mesh: ProcessMesh | None) -> torch.Tensor:
    """Sum of every element of the global tensor whose block this rank holds; float32 or wider."""
    local = x.to(torch.promote_types(x.dtype, torch.float32)).sum()
    return local if mesh is None else reduce_from_group(local, mesh.model_group)


def global_count(x: torch.Tensor, mesh: ProcessMesh | None) -> int:
    """Number of elements of the global tensor (blocks may differ in size: uneven splits)."""
    count = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)  # NCCL needs device tensors
    return int(count) if mesh is None else int(all_reduce_sum(count, mesh.model_group))


def global_mean(x: torch.Tensor, mesh: ProcessMesh | None) -> torch.Tensor:
    """Mean over the global tensor, the same scalar on every rank of the model group."""
    return global_sum(x, mesh) / global_count(x, mesh)


@torch.no_grad()
def average_gradients(model: torch.nn.Module, mesh: ProcessMesh | None) -> None:
    """Average every gradient over the replica group (data x sample), in place.

    The ranks of a replica group hold the same parameter shard and saw different samples;
    their mean gradient is the serial gradient of the mean loss over all their samples.
    (DeepSpeed does this itself, with ZeRO; this is for plain training loops and tests.)
    """
    group = None if mesh is None else mesh.replica_group
    if group is None:
        return
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
            param.grad /= mesh.replicas
