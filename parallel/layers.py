"""The factory the model builds its layers through: one object per (mesh, token grid).

The model asks for partitions ("the hidden channels", "the tokens") and layers over them;
which rank holds what follows from the mesh. On the serial mesh every partition has one
part and every layer is plain PyTorch.
"""

from __future__ import annotations

from torch import nn

from parallel.dropout import PositionDropout
from parallel.linear import ChannelLinear, TokenLinear
from parallel.mesh import MeshError, ProcessMesh
from parallel.norm import LayerNorm
from parallel.tiling import DomainTiling, Partition
from parallel.variational import VariationalChannelLinear, VariationalTokenLinear, WeightNoise


# dropout probabilities up to which PositionDropout is cheaper than a mask (LayerFactory.dropout)
POSITIONS_UP_TO = 0.05


class LayerFactory:
    def __init__(self, mesh: ProcessMesh | None, token_grid: tuple[int, int], patch: tuple[int, int]):
        self.mesh = mesh or ProcessMesh.serial()
        tiles = self.mesh.config.domain
        try:
            self.tiling = DomainTiling(*token_grid, *tiles, patch=tuple(patch))
        except ValueError as error:
            raise MeshError(f"mesh.domain = {tiles[0]}x{tiles[1]} does not fit the token grid "
                            f"{token_grid[0]}x{token_grid[1]} (patch {patch[0]}x{patch[1]}): {error}") from None

    @property
    def tokens(self) -> Partition:
        return self.tiling.tokens

    def tile_bounds(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """This rank's ``((lat0, lat1), (lon0, lon1))`` in model-grid points."""
        return self.tiling.tile_bounds(self.mesh.domain_rank)

    def channels(self, n: int) -> Partition:
        """``n`` channels split over the tensor axis."""
        return Partition.contiguous(n, self.mesh.config.tensor)

    def token_features(self, n: int) -> Partition:
        """``n`` hidden token features (token-MLP hidden) split over the domain axis."""
        return Partition.contiguous(n, self.mesh.config.domain_size)

    def channel_linear(self, inputs: Partition, outputs: Partition, bias: bool = True) -> ChannelLinear:
        return ChannelLinear(self.mesh, inputs, outputs, bias)

    def token_linear(self, inputs: Partition, outputs: Partition, channels: Partition,
                     bias: bool = True) -> TokenLinear:
        """Mixes the token dimension of activations whose channels are split as ``channels``."""
        return TokenLinear(self.mesh, inputs, outputs, channels, bias)

    def variational_channel_linear(self, inputs: Partition, outputs: Partition, noise: WeightNoise,
                                   prior_std: float = 1.0, init_sigma: float = 0.01,
                                   bias: bool = True) -> VariationalChannelLinear:
        """A channel linear with mean-field Gaussian weights, prior ``N(0, prior_std^2)``; ``noise``
        is the model's one :class:`~parallel.variational.WeightNoise`."""
        return VariationalChannelLinear(self.mesh, inputs, outputs, noise, prior_std, init_sigma, bias)

    def variational_token_linear(self, inputs: Partition, outputs: Partition, channels: Partition,
                                 noise: WeightNoise, prior_std: float = 1.0, init_sigma: float = 0.01,
                                 bias: bool = True) -> VariationalTokenLinear:
        """A token linear with mean-field Gaussian weights (see :meth:`variational_channel_linear`)."""
        return VariationalTokenLinear(self.mesh, inputs, outputs, channels, noise, prior_std, init_sigma, bias)

    def layer_norm(self, channels: Partition, eps: float = 1e-5) -> LayerNorm:
        return LayerNorm(self.mesh, channels, eps)

    def dropout(self, p: float) -> nn.Module:
        """Dropout drawing from the default generators, which ``parallel.rng.seed_dropout`` seeds
        per (data, sample, model) rank: the dropped positions where under 1 in 20 are dropped,
        a mask otherwise (a position costs about as much as 20 mask entries: a 64-bit index
        drawn, selected and read in forward and backward, against a byte and a random number)."""
        return PositionDropout(p) if p <= POSITIONS_UP_TO else nn.Dropout(p)
