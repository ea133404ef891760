"""How global index ranges are split over the ranks of one mesh axis.

A :class:`Partition` assigns every global index of one dimension (tokens, channels,
features) to exactly one part, in an order. Part ``k`` holds ``indices[k]``; a rank's local
tensor holds those global entries in that order. Gathering over the axis concatenates the
parts, so the gathered order is ``cat(indices)`` - the parallel layers index their weight
blocks with it. This one description covers contiguous channel slices, a domain tile's
(non-contiguous) token list, the decoder's concatenated features and patch features, and
uneven splits: there are no per-mesh-shape special cases anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


def balanced_sizes(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` sizes differing by at most one, larger ones first."""
    return [n // parts + (k < n % parts) for k in range(parts)]


def balanced_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Half-open ``[start, stop)`` ranges of :func:`balanced_sizes`."""
    bounds, start = [], 0
    for size in balanced_sizes(n, parts):
        bounds.append((start, start + size))
        start += size
    return bounds


@dataclass(frozen=True, eq=False)
class Partition:
    size: int  # global length of the dimension
    indices: tuple[torch.Tensor, ...]  # global indices held by each part (int64)

    @classmethod
    def contiguous(cls, size: int, parts: int) -> "Partition":
        return cls(size, tuple(torch.arange(a, b) for a, b in balanced_bounds(size, parts)))

    @classmethod
    def concat(cls, first: "Partition", second: "Partition") -> "Partition":
        """The partition of ``cat([a, b], dim)`` when each part concatenates its local pieces."""
        if first.parts != second.parts:
            raise ValueError(f"cannot concatenate partitions over {first.parts} and {second.parts} parts")
        return cls(first.size + second.size,
                   tuple(torch.cat([a, b + first.size]) for a, b in zip(first.indices, second.indices)))

    @classmethod
    def patch_features(cls, channels: "Partition", patch_size: int) -> "Partition":
        """Features of a flattened patch ``(position, channel)`` when channels are split.

        Global feature ``position * C + channel``; each part holds every position of its
        channels, position-major, as the local reshape produces them.
        """
        positions = torch.arange(patch_size)[:, None] * channels.size
        return cls(channels.size * patch_size,
                   tuple((positions + idx[None, :]).reshape(-1) for idx in channels.indices))

    @property
    def parts(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:  # not cached: forwards read it, and dynamo cannot trace cached_property's lock
        return [len(i) for i in self.indices]

    @cached_property
    def gathered_order(self) -> torch.Tensor:
        """Global indices in the order an all-gather over the axis lays them out."""
        return torch.cat(self.indices)

    def is_identity(self) -> bool:
        return self.parts == 1 and torch.equal(self.indices[0], torch.arange(self.size))


@dataclass(frozen=True)
class DomainTiling:
    """The token grid ``(rows, cols)`` cut into ``(tiles_lat, tiles_lon)`` tiles of whole tokens.

    Tile ``i = a * tiles_lon + b`` holds token rows ``row_bounds[a]`` and columns
    ``col_bounds[b]``; its tokens (global index ``row * cols + col``) are listed row-major.
    On the grid, a token is one patch of ``patch`` points, so tile bounds in grid points are
    token bounds times the patch: tiles always align to patch boundaries.
    """

    token_rows: int
    token_cols: int
    tiles_lat: int
    tiles_lon: int
    patch: tuple[int, int]

    def __post_init__(self) -> None:
        if self.tiles_lat > self.token_rows:
            raise ValueError(f"domain tile grid {self.tiles_lat}x{self.tiles_lon}: {self.tiles_lat} latitude "
                             f"tiles but only {self.token_rows} rows of patches; expected at most {self.token_rows}")
        if self.tiles_lon > self.token_cols:
            raise ValueError(f"domain tile grid {self.tiles_lat}x{self.tiles_lon}: {self.tiles_lon} longitude "
                             f"tiles but only {self.token_cols} columns of patches; expected at most "
                             f"{self.token_cols}")

    @property
    def n_tiles(self) -> int:
        return self.tiles_lat * self.tiles_lon

    def tile_token_bounds(self, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
        a, b = divmod(tile, self.tiles_lon)
        return balanced_bounds(self.token_rows, self.tiles_lat)[a], balanced_bounds(self.token_cols, self.tiles_lon)[b]

    def tile_bounds(self, tile: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((lat_start, lat_stop), (lon_start, lon_stop))`` of a tile in model-grid points."""
        (r0, r1), (c0, c1) = self.tile_token_bounds(tile)
        return (r0 * self.patch[0], r1 * self.patch[0]), (c0 * self.patch[1], c1 * self.patch[1])

    @cached_property
    def tokens(self) -> Partition:
        parts = []
        for tile in range(self.n_tiles):
            (r0, r1), (c0, c1) = self.tile_token_bounds(tile)
            parts.append((torch.arange(r0, r1)[:, None] * self.token_cols + torch.arange(c0, c1)[None, :]).reshape(-1))
        return Partition(self.token_rows * self.token_cols, tuple(parts))


# ---------------------------------------------------------------------------- store chunks
def store_tile_chunks(grid: tuple[int, int], tile_grid: tuple[int, int]) -> tuple[int, int]:
    """Spatial chunks of a data store for a domain tile grid: one chunk per tile, ``n // tiles``
    latitude rows and ``ceil(n / tiles)`` longitude points.

    Latitude rounds down because models crop the rows that do not divide (721 rows -> 720, tiles
    of 360 / 180 / 90 rows); the leftover rows form a last, short chunk that no tile reads.
    Rounding up (361) would make every tile after the first straddle two chunks. Longitude is
    never cropped.
    """
    for axis, n, tiles in zip(("latitude", "longitude"), grid, tile_grid):
        if not 1 <= tiles <= n:
            raise ValueError(f"tile grid {tile_grid[0]}x{tile_grid[1]}: {tiles} tiles along {axis}, expected "
                             f"1..{n} (the grid has {n} {axis} points)")
    return grid[0] // tile_grid[0], -(-grid[1] // tile_grid[1])


def chunk_length(bounds: list[tuple[int, int]], size: int) -> int:
    """The largest chunk length that puts every tile boundary (clipped to ``size``) on a chunk
    edge, so that ranks writing their tiles never share a chunk."""
    edges = {min(edge, size) for pair in bounds for edge in pair} - {0}
    return math.gcd(*edges) if edges else size
