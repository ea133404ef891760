"""The autograd-aware collectives the parallel layers are written with.

Each function is the identity on a group of one rank (the serial mesh costs nothing).
Sizes along the collective dimension may differ between ranks (uneven splits): tensors
are padded to the largest part for the transfer and trimmed after.

* ``gather_from_group``   forward: all-gather along ``dim``; backward: reduce-scatter (sum) of the gradient.
* ``reduce_scatter_to_group`` forward: sum over the group, keep this rank's part of ``dim``; backward: all-gather.
* ``all_reduce_sum``      forward: sum over the group; backward: sum of the gradients over the group.
* ``reduce_from_group``   forward: sum over the group; backward: identity (each rank backpropagates its own copy).
* ``all_to_all``          forward: scatter parts of one dim, gather along another; backward: the reverse all-to-all.

``all_reduce_sum`` is for a sum every rank then uses differently (LayerNorm statistics of
its own channels): the gradient of a rank's input collects every rank's use. ``reduce_from_group``
is for a value every rank uses identically (the loss of the whole replica): each rank runs
the same backward from it, so the gradient of its own part is just the incoming one.

``traffic`` counts the bytes each rank sends under the ring algorithm (all-gather and
reduce-scatter send ``(P-1)/P`` of the full tensor, all-reduce twice that), so benchmarks
can compare measured traffic with the analytic formulas.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

traffic: Counter = Counter()  # collective name -> bytes sent by this rank (eager calls only)


def _count(name: str, nbytes: int) -> None:
    """Add to :data:`traffic`, outside compiled graphs: a global mutation there is a side
    effect dynamo refuses inside autograd functions, and would break the graph at every
    collective."""
    if not torch.compiler.is_compiling():
        traffic[name] += nbytes

# torch 2.13 (CPU install) deprecates reduce_scatter_tensor for reduce_scatter_single; torch 2.11
# (GPU machines) has only the old name
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def _all_gather(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    width = max(sizes)
    local = _pad_rows(x.movedim(dim, 0).contiguous(), width)
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local, group=group)
    _count("all_gather", local.numel() * local.element_size() * (len(sizes) - 1))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    width = max(sizes)
    rows = x.movedim(dim, 0)
    stacked = torch.cat([_pad_rows(part, width) for part in rows.split(list(sizes))]).contiguous()
    out = torch.empty((width,) + stacked.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_tensor(out, stacked, group=group)
    _count("reduce_scatter", out.numel() * out.element_size() * (len(sizes) - 1))
    return out[: sizes[dist.get_rank(group)]].movedim(0, dim)


def _pad_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    return x if x.shape[dim] == size else F.pad(x, (0, 0) * (x.dim() - dim - 1) + (0, size - x.shape[dim]))


def _all_to_all(x: torch.Tensor, split_dim: int, split_sizes: Sequence[int], cat_dim: int,
                cat_sizes: Sequence[int], group) -> torch.Tensor:
    rank = dist.get_rank(group)
    parts = [_pad_dim(_pad_dim(part, split_dim, max(split_sizes)), cat_dim, max(cat_sizes))
             for part in x.split(list(split_sizes), dim=split_dim)]
    send = torch.stack(parts).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    _count("all_to_all", send[0].numel() * send.element_size() * (len(parts) - 1))
    return torch.cat([received[k].narrow(split_dim, 0, split_sizes[rank]).narrow(cat_dim, 0, cat_sizes[k])
                      for k in range(len(parts))], dim=cat_dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    size = group_size(group)
    _count("all_reduce", 2 * x.numel() * x.element_size() * (size - 1) // size)
    return x


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return _all_gather(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.sizes, ctx.group), None, None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return _reduce_scatter(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad.contiguous(), ctx.dim, ctx.sizes, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, split_dim, split_sizes, cat_dim, cat_sizes, group):
        ctx.args = (cat_dim, cat_sizes, split_dim, split_sizes, group)
        return _all_to_all(x, split_dim, split_sizes, cat_dim, cat_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), *ctx.args), None, None, None, None, None


def gather_from_group(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    """Forward: all-gather ``x`` along ``dim`` (rank k gives ``sizes[k]`` entries); backward: reduce-scatter (sum)."""
    return x if group_size(group) == 1 else _GatherFromGroup.apply(x, dim % x.dim(), tuple(sizes), group)


def reduce_scatter_to_group(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    """Forward: sum over the group, keep this rank's ``sizes[rank]`` entries of ``dim``; backward: all-gather."""
    return x if group_size(group) == 1 else _ReduceScatterToGroup.apply(x, dim % x.dim(), tuple(sizes), group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: sum over the group on every rank; backward: sum of every rank's gradient (all-reduce)."""
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: sum over the group, one replicated value; backward: identity (each rank's own copy)."""
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def all_to_all(x: torch.Tensor, split_dim: int, split_sizes: Sequence[int], cat_dim: int, cat_sizes: Sequence[int],
               group) -> torch.Tensor:
    """Forward: send part k of ``split_dim`` to rank k, concatenate what rank k sent along ``cat_dim`` (it has
    ``cat_sizes[k]`` entries); backward: the same all-to-all with the two dims' roles swapped."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, split_dim % x.dim(), tuple(split_sizes), cat_dim % x.dim(), tuple(cat_sizes), group)
