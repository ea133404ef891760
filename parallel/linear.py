"""The Jigsaw linear layers: channel mixing and token mixing on ``(batch, tokens, channels)``.

A rank ``(i, j)`` (domain i, tensor j) holds the activation block ``X[tokens of tile i,
channels of slice j]`` and one block of every weight; no rank holds a full weight.

* :class:`ChannelLinear` ``Y = X Wᵀ`` (contraction over channels): all-gather this slice's
  weight block over domain, and either all-gather ``X`` over tensor before the local GEMM
  or reduce-scatter its partial output over tensor after it (whichever activation is
  narrower). Backward: each gather becomes a reduce-scatter and vice versa (the weight
  gradient's reduce-scatter over domain also sums the contributions of all tiles).
* :class:`TokenLinear` ``Z = W X`` (contraction over tokens): all-gather this tile's weight
  columns over tensor, multiply the local tokens (a partial sum over all output tokens),
  reduce-scatter over domain to the output tiles. No rank ever gathers all tokens.

Weights are stored ``(out, in)`` as in ``torch.nn.Linear``, so the serial model's state dict
is the full state of every mesh.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.comm import gather_from_group, reduce_scatter_to_group
from parallel.mesh import ProcessMesh
from parallel.rng import uniform_at
from parallel.sharding import ShardSpec, sharded_parameter
from parallel.tiling import Partition, balanced_bounds, balanced_sizes


def split_over(indices: torch.Tensor, parts: int, part: int) -> tuple[torch.Tensor, list[int]]:
    """Part ``part`` of ``indices`` cut into ``parts`` balanced pieces, and all piece sizes."""
    start, stop = balanced_bounds(len(indices), parts)[part]
    return indices[start:stop], balanced_sizes(len(indices), parts)


class ShardedModule(nn.Module):
    """Base for layers whose parameters are sharded: creates and initialises them per shard."""

    def __init__(self, mesh: ProcessMesh):
        super().__init__()
        self.mesh = mesh

    def _parameter(self, spec: ShardSpec) -> nn.Parameter:
        return sharded_parameter(spec, model_parallel=self.mesh.config.model_size > 1)

    @torch.no_grad()
    def init_uniform(self, seed: int, prefix: str, fan_in: int) -> None:
        """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as ``nn.Linear`` does; every element's value
        depends on its global position only, so all meshes start from the serial model."""
        bound = 1 / math.sqrt(fan_in)
        for name, param in self.named_parameters(recurse=False):
            spec = param.shard
            values = uniform_at(seed, "init", f"{prefix}.{name}", index=spec.index, global_shape=spec.global_shape,
                                device=param.device)
            param.copy_(values * 2 * bound - bound)


class ChannelLinear(ShardedModule):
    """Linear map of the last (channel) dimension; input and output channels split over tensor.

    The activation moves over tensor either as the input (all-gather, then this slice's
    outputs) or as the output (partial sums over this slice's inputs, then reduce-scatter):
    both send ``(Pt-1)/Pt`` of one activation, so the layer moves the narrower of the two
    (the decoder's recovery maps 2 x hidden features to fewer patch features). The weight
    block moves over domain either way: it is smaller than the activations it would
    otherwise replace (all tokens).
    """

    def __init__(self, mesh: ProcessMesh, inputs: Partition, outputs: Partition, bias: bool = True):
        super().__init__(mesh)
        self.inputs, self.outputs = inputs, outputs
        self.reduce_outputs = outputs.size < inputs.size
        t, d, domains = mesh.tensor_rank, mesh.domain_rank, mesh.config.domain_size
        if self.reduce_outputs:  # weight rows: every output; columns: this slice's inputs
            rows, self.row_sizes = split_over(outputs.gathered_order, domains, d)
            columns = inputs.indices[t]
        else:  # weight rows: this slice's outputs; columns: every input
            rows, self.row_sizes = split_over(outputs.indices[t], domains, d)
            columns = inputs.gathered_order
        self.weight = self._parameter(ShardSpec((outputs.size, inputs.size), (rows, columns)))
        bias_rows, self.bias_sizes = split_over(outputs.indices[t], domains, d)
        self.bias = self._parameter(ShardSpec((outputs.size,), (bias_rows,))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = gather_from_group(self.weight, 0, self.row_sizes, self.mesh.domain_group).to(x.dtype)
        if self.reduce_outputs:
            y = reduce_scatter_to_group(F.linear(x, weight), -1, self.outputs.sizes, self.mesh.tensor_group)
        else:
            y = F.linear(gather_from_group(x, -1, self.inputs.sizes, self.mesh.tensor_group), weight)
        if self.bias is None:
            return y
        return y + gather_from_group(self.bias, 0, self.bias_sizes, self.mesh.domain_group).to(x.dtype)

    def reset_parameters(self, seed: int, prefix: str) -> None:
        self.init_uniform(seed, prefix, self.inputs.size)


class TokenLinear(ShardedModule):
    """Linear map of the token dimension (dim 1); input and output tokens split over domain."""

    def __init__(self, mesh: ProcessMesh, inputs: Partition, outputs: Partition, bias: bool = True):
        super().__init__(mesh)
        self.inputs, self.outputs = inputs, outputs
        rows, self.row_sizes = split_over(outputs.gathered_order, mesh.config.tensor, mesh.tensor_rank)
        self.weight = self._parameter(ShardSpec((outputs.size, inputs.size), (rows, inputs.indices[mesh.domain_rank])))
        bias_rows, self.bias_sizes = split_over(outputs.indices[mesh.domain_rank], mesh.config.tensor, mesh.tensor_rank)
        self.bias = self._parameter(ShardSpec((outputs.size,), (bias_rows,))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = gather_from_group(self.weight, 0, self.row_sizes, self.mesh.tensor_group).to(x.dtype)
        partial = torch.matmul(weight, x)  # (batch, all output tokens, local channels)
        y = reduce_scatter_to_group(partial, 1, self.outputs.sizes, self.mesh.domain_group)
        if self.bias is not None:
            bias = gather_from_group(self.bias, 0, self.bias_sizes, self.mesh.tensor_group)
            y = y + bias.to(x.dtype)[:, None]
        return y

    def reset_parameters(self, seed: int, prefix: str) -> None:
        self.init_uniform(seed, prefix, self.inputs.size)
