"""LayerNorm over channels split across the tensor group, with exact global statistics."""

from __future__ import annotations

import torch
from torch import nn

from parallel.comm import all_reduce_sum, gather_from_group
from parallel.linear import ShardedModule, split_over
from parallel.mesh import ProcessMesh
from parallel.sharding import ShardSpec
from parallel.tiling import Partition


class LayerNorm(ShardedModule):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over all channels of the partition.

    Each rank's channel slice gives its mean and variance in one pass; their combination over
    the tensor group (in float32 or wider) gives the serial statistics, so the result equals the
    serial LayerNorm; the affine parameters are split over domain and gathered like the
    channel-linear weights.
    """

    def __init__(self, mesh: ProcessMesh, channels: Partition, eps: float = 1e-5):
        super().__init__(mesh)
        self.channels, self.eps = channels, eps
        rows, self.row_sizes = split_over(channels.indices[mesh.tensor_rank], mesh.config.domain_size, mesh.domain_rank)
        self.weight = self._parameter(ShardSpec((channels.size,), (rows,)))
        self.bias = self._parameter(ShardSpec((channels.size,), (rows,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, total, local = self.mesh.tensor_group, self.channels.size, x.shape[-1]
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        # one pass per row for this slice's statistics (a Welford reduction once compiled), then
        # Chan's combination over the tensor group: the global mean, and the global variance as
        # the slices' variances plus the spread of their means
        local_var, local_mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        mean = all_reduce_sum(local_mean * local, group) / total
        var = all_reduce_sum((local_var + (local_mean - mean).square()) * local, group) / total
        weight = gather_from_group(self.weight, 0, self.row_sizes, self.mesh.domain_group)
        bias = gather_from_group(self.bias, 0, self.row_sizes, self.mesh.domain_group)
        return ((h - mean) * torch.rsqrt(var + self.eps) * weight.to(compute) + bias.to(compute)).to(x.dtype)

    @torch.no_grad()
    def reset_parameters(self, seed: int, prefix: str) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
