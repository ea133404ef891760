"""Sharding metadata on parameters, and conversion between full and sharded state.

Every parameter of a model built on a mesh carries ``param.shard``, a :class:`ShardSpec`:
the global shape and, per dimension, the global indices this rank holds (in local order).
Checkpoints, gradient-norm flags, the resharding converter and the tests all read this one
description; no layer keeps its own list.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from parallel.fp8 import histories_loaded


class ShardingError(ValueError):
    """A state that does not fit the model (names the parameter, shape and expectation)."""


@dataclass(frozen=True, eq=False)
class ShardSpec:
    global_shape: tuple[int, ...]
    index: tuple[torch.Tensor, ...]  # per dimension: global indices held locally, in local order

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.index)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensor."""
        out = full
        for dim, idx in enumerate(self.index):
            out = out.index_select(dim, idx.to(full.device))
        return out

    def put(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        """Write this rank's shard into ``full`` in place."""
        full[torch.meshgrid(*[i.to(full.device) for i in self.index], indexing="ij")] = shard

    def to_json(self) -> dict:
        return {"global_shape": list(self.global_shape), "index": [i.tolist() for i in self.index]}

    @classmethod
    def from_json(cls, item: dict) -> "ShardSpec":
        return cls(tuple(item["global_shape"]), tuple(torch.tensor(i, dtype=torch.long) for i in item["index"]))


def sharded_parameter(spec: ShardSpec, dtype=None, device=None) -> nn.Parameter:
    """An empty parameter carrying its sharding metadata (``param.shard``)."""
    param = nn.Parameter(torch.empty(spec.local_shape, dtype=dtype, device=device))
    param.shard = spec
    return param


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    specs = {}
    for name, param in model.named_parameters():
        if not hasattr(param, "shard"):
            raise ShardingError(f"parameter {name} has no sharding metadata; build every layer through parallel/")
        specs[name] = param.shard
    return specs


def replicated_spec(shape: tuple[int, ...]) -> ShardSpec:
    """The spec of a tensor every rank of the model group holds whole (replicated state)."""
    return ShardSpec(tuple(shape), tuple(torch.arange(size) for size in shape))


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of ``model``'s state dict (state that is not a parameter: FP8 amax histories).

    They are replicated (the same on every rank: an amax history is reduced over all ranks each
    step), so checkpoints hold them whole (:func:`replicated_spec`)
    and any mesh loads them as they are."""
    return {f"{prefix}.{name}" if prefix else name: buffer
            for prefix, module in model.named_modules() for name, buffer in module._buffers.items()
            if buffer is not None and name not in module._non_persistent_buffers_set}


def state_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """The spec of every tensor of the model's state: the parameters' shards, the buffers whole."""
    return {**shard_specs(model), **{name: replicated_spec(buffer.shape)
                                     for name, buffer in persistent_buffers(model).items()}}


@torch.no_grad()
def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Load a mesh-free full state dict (parameters and persistent buffers) into a (possibly
    sharded) model: each rank takes its shard."""
    specs = state_specs(model)
    missing, unexpected = sorted(set(specs) - set(full_state)), sorted(set(full_state) - set(specs))
    if missing or unexpected:
        raise ShardingError(f"state does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}; "
                            f"was it saved from another model configuration?")
    tensors = {**dict(model.named_parameters()), **persistent_buffers(model)}
    for name, spec in specs.items():
        full = full_state[name]
        if tuple(full.shape) != spec.global_shape:
            raise ShardingError(f"{name}: state has shape {tuple(full.shape)}, the model expects "
                                f"{spec.global_shape}; was it saved from another model configuration?")
        tensors[name].copy_(spec.take(full))
    histories_loaded(model)


def assemble_full_state(rank_states: list[dict[str, tuple[dict, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Full state from every model rank's ``{name: (ShardSpec json, shard)}``."""
    names = rank_states[0].keys()
    return {name: _assemble(tuple(rank_states[0][name][0]["global_shape"]),
                            [(ShardSpec.from_json(s[name][0]), s[name][1]) for s in rank_states],
                            rank_states[0][name][1].dtype)
            for name in names}


def _assemble(shape, shards, dtype) -> torch.Tensor:
    full = torch.empty(shape, dtype=dtype)
    covered = torch.zeros(shape, dtype=torch.int32)
    for spec, shard in shards:
        spec.put(full, shard.cpu().to(dtype))
        spec.put(covered, torch.ones(spec.local_shape, dtype=torch.int32))
    if (covered == 0).any():
        raise ShardingError(f"shards cover {int((covered > 0).sum())} of {covered.numel()} elements of a "
                            f"parameter of shape {tuple(shape)}; expected every element once")
    return full


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh, norm_type: float = 2.0) -> torch.Tensor:
    """The Euclidean (p-) norm of the whole model's gradient, the same on every rank.

    Every parameter element lives on exactly one rank of the model group (see
    :class:`ShardSpec`), so the local sums of ``|g|^p`` add up over that group with no double
    counting. Gradients are assumed averaged over the replica group already. The local norm
    is one multi-tensor kernel accumulating in float32 whatever the gradients' dtype (bf16
    gradients read half the bytes, the norm stays exact to float32); nothing waits for the host.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dtype = functools.reduce(torch.promote_types, {grad.dtype for grad in grads}, torch.float32)
    norms = torch._foreach_norm(grads, norm_type, dtype=dtype)
    local = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    group = None if mesh is None else mesh.model_group
    if group is None:
        return local
    total = local.pow(norm_type)
    dist.all_reduce(total, group=group)
    return total.pow(1.0 / norm_type)
