"""The Jigsaw linear layers: channel mixing and token mixing on ``(tokens, batch, channels)``.

A rank ``(i, j)`` (domain i, tensor j) holds the activation block ``X[tokens of tile i,
channels of slice j]`` and one block of every weight; no rank holds a full weight.

* :class:`ChannelLinear` ``Y = X Wᵀ`` (contraction over channels): all-gather this slice's
  weight block over domain, and either all-gather ``X`` over tensor before the local GEMM
  or reduce-scatter its partial output over tensor after it (whichever activation is
  narrower). Backward: each gather becomes a reduce-scatter and vice versa (the weight
  gradient's reduce-scatter over domain also sums the contributions of all tiles).
* :class:`TokenLinear` ``Z = W X`` (contraction over tokens): partial sums over the tile's
  input tokens, reduce-scattered over domain to the output tiles; over tensor either the
  activations move (gather the input, all-to-all the output: weight-stationary) or the
  weight block does, whichever is smaller for the batch. No rank ever gathers all tokens.

Weights are stored ``(out, in)`` as in ``torch.nn.Linear``, so the serial model's state dict
is the full state of every mesh.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parallel.comm import all_to_all, gather_from_group, reduce_scatter_to_group
from parallel.fp8 import FP8MatMul
from parallel.mesh import ProcessMesh
from parallel.rng import uniform_at
from parallel.sharding import ShardSpec, sharded_parameter
from parallel.tiling import Partition, balanced_bounds, balanced_sizes


def split_over(indices: torch.Tensor, parts: int, part: int) -> tuple[torch.Tensor, list[int]]:
    """Part ``part`` of ``indices`` cut into ``parts`` balanced pieces, and all piece sizes."""
    start, stop = balanced_bounds(len(indices), parts)[part]
    return indices[start:stop], balanced_sizes(len(indices), parts)


@torch.no_grad()
def init_uniform_shard(param: nn.Parameter, seed: int, name: str, fan_in: int) -> None:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as ``nn.Linear`` does, keyed by the parameter's
    global ``name``; every element's value depends on its global position only, so all meshes
    start from the serial model."""
    bound = 1 / math.sqrt(fan_in)
    spec = param.shard
    values = uniform_at(seed, "init", name, index=spec.index, global_shape=spec.global_shape, device=param.device)
    param.copy_(values * 2 * bound - bound)


class ShardedModule(nn.Module):
    """Base for layers whose parameters are sharded: creates and initialises them per shard."""

    def __init__(self, mesh: ProcessMesh):
        super().__init__()
        self.mesh = mesh

    def _parameter(self, spec: ShardSpec) -> nn.Parameter:
        return sharded_parameter(spec)

    @torch.no_grad()
    def init_uniform(self, seed: int, prefix: str, fan_in: int) -> None:
        for name, param in self.named_parameters(recurse=False):
            init_uniform_shard(param, seed, f"{prefix}.{name}", fan_in)


class ShardedLinear(ShardedModule):
    """Base of the linear layers: a weight and an optional bias, each one block per rank.

    The layers' forwards take the blocks from :meth:`local_weights`, so a layer whose blocks
    are computed (a variational layer samples them from a mean and a scale sharded alike)
    overrides where the blocks come from and reuses the collectives unchanged.
    """

    def __init__(self, mesh: ProcessMesh):
        super().__init__(mesh)
        # the local matrix products in FP8 (parallel.fp8; a submodule: a delayed recipe's amax
        # history is model state); None: in the weights' dtype
        self.fp8: FP8MatMul | None = None

    def _create_weights(self, weight: ShardSpec, bias: ShardSpec | None) -> None:
        """Create the parameters of this rank's weight and bias blocks."""
        self.weight = self._parameter(weight)
        self.bias = None if bias is None else self._parameter(bias)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's weight and bias blocks for the next forward."""
        return self.weight, self.bias


class ChannelLinear(ShardedLinear):
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
        bias_rows, self.bias_sizes = split_over(outputs.indices[t], domains, d)
        self._create_weights(ShardSpec((outputs.size, inputs.size), (rows, columns)),
                             ShardSpec((outputs.size,), (bias_rows,)) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.local_weights()
        weight = gather_from_group(weight, 0, self.row_sizes, self.mesh.domain_group).to(x.dtype)
        if self.reduce_outputs:
            y = reduce_scatter_to_group(self._linear(x, weight), -1, self.outputs.sizes, self.mesh.tensor_group)
        else:
            y = self._linear(gather_from_group(x, -1, self.inputs.sizes, self.mesh.tensor_group), weight)
        if bias is None:
            return y
        # in the product's dtype (bf16 under autocast, as nn.Linear's bias): an fp32 bias would
        # promote every activation after it to fp32 and double the element-wise traffic
        return y + gather_from_group(bias, 0, self.bias_sizes, self.mesh.domain_group).to(y.dtype)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, weight)
        return self.fp8(x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], weight.shape[0])

    def reset_parameters(self, seed: int, prefix: str) -> None:
        self.init_uniform(seed, prefix, self.inputs.size)


def mix_tokens(weight: torch.Tensor, x: torch.Tensor, matmul=torch.matmul) -> torch.Tensor:
    """``weight @ x``: ``(out, in) x (in, batch, channels) -> (out, batch, channels)``.

    Tokens lead the activations' layout, so the samples of a batch sit side by side in each
    token's row: the whole batch is one ``(in, batch x channels)`` matrix and the mixing one
    matrix product, in backward too (the weight gradient contracts over batch x channels in the
    same product, no per-sample products to sum, no copies). With the batch leading, each
    sample needs its own product and their outputs a stacking copy (``benchmarks/GPU.md``).
    """
    tokens, batch, channels = x.shape
    return matmul(weight, x.reshape(tokens, batch * channels)).reshape(weight.shape[0], batch, channels)


def token_mixing_moves_weight(batch: int, inputs: Partition, outputs: Partition, channels: list[int],
                              domains: int, tensor: int) -> bool:
    """Whether a token linear sends fewer bytes moving its weight than moving activations.

    Elements one rank sends per forward, from sizes every rank of the model group knows (so
    all of them choose alike): the weight block of a tile against the tile's input and
    output with every channel. A token weight is wider than one sample's activations
    (``jigsaw-1b``: 8640 x 17280 against 17280 tokens x 4320 channels), narrower than many.
    """
    width, tile, piece = max(channels), max(inputs.sizes), -(-max(outputs.sizes) // tensor)
    activations = batch * ((tile + piece) * width * (tensor - 1) + piece * sum(channels) * (domains - 1))
    weight = -(-outputs.size // tensor) * tile * (tensor - 1) + batch * max(outputs.sizes) * width * (domains - 1)
    return weight < activations


class TokenLinear(ShardedLinear):
    """Linear map of the token dimension (dim 0); input and output tokens split over domain.

    Rank (i, j) holds the weight columns of tile i's input tokens and, of every output tile,
    the j-th piece of its tokens (no rank holds another's block). Per call, the cheaper of two
    schedules runs (:func:`token_mixing_moves_weight`; the batch decides):

    * activations move (weight-stationary): gather the tile's input over tensor (every
      channel), multiply, reduce-scatter the partial sums over domain (each tile gets piece j
      of its outputs), all-to-all over tensor to swap pieces for channel slices;
    * the weight moves: gather tile i's weight columns over tensor, multiply the local
      channels, reduce-scatter the partial sums over domain to the output tiles.
    """

    def __init__(self, mesh: ProcessMesh, inputs: Partition, outputs: Partition, channels: Partition,
                 bias: bool = True):
        super().__init__(mesh)
        self.inputs, self.outputs = inputs, outputs
        self.channels = channels.sizes  # of the activations it mixes, split over tensor
        tensor, t, d = mesh.config.tensor, mesh.tensor_rank, mesh.domain_rank
        rows_of = [[split_over(tile, tensor, k)[0] for tile in outputs.indices] for k in range(tensor)]
        pieces = rows_of[t]  # piece t of every output tile
        self.piece_sizes = [len(piece) for piece in pieces]
        self.tile_piece_sizes = balanced_sizes(len(outputs.indices[d]), tensor)
        self.row_sizes = [sum(len(piece) for piece in rows) for rows in rows_of]
        # gathered weight rows (tensor rank, tile, piece) -> output tiles in order (tile, piece)
        gathered = torch.cat([torch.cat(rows) for rows in rows_of])
        position = torch.empty(outputs.size, dtype=torch.long)
        position[gathered] = torch.arange(outputs.size)
        self.register_buffer("tile_order", position[outputs.gathered_order], persistent=False)  # moves with .to()
        self._create_weights(ShardSpec((outputs.size, inputs.size), (torch.cat(pieces), inputs.indices[d])),
                             ShardSpec((outputs.size,), (pieces[d],)) if bias else None)
        self.schedule: str | None = None  # None: the cheaper; "weight" or "activations" to force one (tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.channels
        if x.shape[-1] != channels[self.mesh.tensor_rank]:
            raise ValueError(f"TokenLinear: input has {x.shape[-1]} channels, this rank's slice of the "
                             f"{sum(channels)} channels it was built for holds {channels[self.mesh.tensor_rank]}")
        config, batch = self.mesh.config, x.shape[1]  # x: (tokens, batch, channels)
        moves_weight = self.schedule == "weight" or (self.schedule is None and token_mixing_moves_weight(
            batch, self.inputs, self.outputs, channels, config.domain_size, config.tensor))
        weight, bias = self.local_weights()
        if moves_weight:
            return self._move_weight(x, weight, bias)
        return self._move_activations(x, weight, bias, channels)

    def _move_activations(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          channels: list[int]) -> torch.Tensor:
        x = gather_from_group(x, -1, channels, self.mesh.tensor_group)  # this tile's tokens, every channel
        # (piece t of every output tile, batch, channels)
        partial = mix_tokens(weight.to(x.dtype), x, self.fp8 or torch.matmul)
        y = reduce_scatter_to_group(partial, 0, self.piece_sizes, self.mesh.domain_group)
        if bias is not None:
            y = y + bias.to(y.dtype)[:, None, None]
        # piece t of this tile's tokens, every channel -> every token of this tile, channel slice t
        return all_to_all(y, -1, channels, 0, self.tile_piece_sizes, self.mesh.tensor_group)

    def _move_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = gather_from_group(weight, 0, self.row_sizes, self.mesh.tensor_group)
        weight = weight.index_select(0, self.tile_order).to(x.dtype)  # rows of every output tile, in tile order
        y = reduce_scatter_to_group(mix_tokens(weight, x, self.fp8 or torch.matmul), 0, self.outputs.sizes,
                                    self.mesh.domain_group)
        if bias is not None:
            bias = gather_from_group(bias, 0, self.tile_piece_sizes, self.mesh.tensor_group)
            y = y + bias.to(y.dtype)[:, None, None]
        return y

    def reset_parameters(self, seed: int, prefix: str) -> None:
        self.init_uniform(seed, prefix, self.inputs.size)
