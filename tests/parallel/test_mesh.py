"""The process mesh: validation messages, group membership, the DeepSpeed mpu adapter."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.layers import LayerFactory
from parallel.mesh import MeshConfig, MeshError, ProcessMesh
from parallel.tiling import DomainTiling
from tests.distributed import spawn


# --- validation (no processes needed) ---------------------------------------------------------
@pytest.mark.parametrize("config,world_size,words", [
    (MeshConfig(data=2, domain=(2, 1), tensor=2), 4,
     ["data x sample x domain x tensor = 2 x 1 x 2 (tile grid 2x1) x 2 = 8", "world size is 4"]),
    (MeshConfig(domain=(1, 3), tensor=1), 4, ["world size 4", "1 x 3 (tile grid 1x3) x 1 = 3", "multiple of 3"]),
    (MeshConfig(sample=3, tensor=2), 8, ["world size 8", "3 x 1 (tile grid 1x1) x 2 = 6"]),
])
def test_product_must_match_world_size(config, world_size, words):
    with pytest.raises(MeshError) as error:
        config.resolve(world_size)
    for word in words:
        assert word in str(error.value), f"{word!r} not in {error.value}"


@pytest.mark.parametrize("values,words", [
    (dict(tensor=0), ["mesh.tensor = 0", "positive integer"]),
    (dict(sample=-1), ["mesh.sample = -1"]),
    (dict(data=0), ["mesh.data = 0"]),
    (dict(tensor=True), ["mesh.tensor = True"]),
    (dict(domain=(2,)), ["mesh.domain = (2,)", "two positive integers"]),
    (dict(domain=4), ["mesh.domain = 4", "(latitude tiles, longitude tiles)"]),
    (dict(domain=(2, 0)), ["mesh.domain = (2, 0)"]),
])
def test_bad_axis_values_are_named(values, words):
    with pytest.raises(MeshError) as error:
        MeshConfig(**values)
    for word in words:
        assert word in str(error.value), f"{word!r} not in {error.value}"


@pytest.mark.parametrize("domain,words", [
    ((10, 1), ["mesh.domain = 10x1", "token grid 9x5", "10 latitude tiles", "only 9 rows of patches"]),
    ((1, 6), ["mesh.domain = 1x6", "6 longitude tiles", "only 5 columns of patches"]),
])
def test_more_tiles_than_patches_is_refused(domain, words):
    mesh = ProcessMesh(MeshConfig(data=1, domain=domain))  # the layout alone decides; no processes needed
    with pytest.raises(MeshError) as error:
        LayerFactory(mesh, (9, 5), (2, 4))
    for word in words + ["patch 2x4"]:
        assert word in str(error.value), f"{word!r} not in {error.value}"


def test_unstarted_distributed_is_refused():
    assert ProcessMesh.build(MeshConfig()).config.model_size == 1  # serial: no processes needed
    with pytest.raises(MeshError, match="not initialised"):
        ProcessMesh.build(MeshConfig(tensor=2))


@pytest.mark.parametrize("rows,cols,tiles", [(9, 5, (2, 1)), (9, 5, (1, 2)), (9, 5, (4, 2)), (7, 3, (3, 3)),
                                             (180, 24, (3, 4))])
def test_tiles_align_to_patches_and_cover_the_grid_once(rows, cols, tiles):
    patch = (2, 3)
    tiling = DomainTiling(rows, cols, *tiles, patch=patch)
    covered = torch.zeros(rows * patch[0], cols * patch[1], dtype=torch.int64)
    for tile in range(tiling.n_tiles):
        (lat0, lat1), (lon0, lon1) = tiling.tile_bounds(tile)
        assert lat0 % patch[0] == lat1 % patch[0] == lon0 % patch[1] == lon1 % patch[1] == 0
        covered[lat0:lat1, lon0:lon1] += 1
        sizes = (lat1 - lat0) // patch[0], (lon1 - lon0) // patch[1]
        assert len(tiling.tokens.indices[tile]) == sizes[0] * sizes[1]
    assert bool((covered == 1).all())
    assert torch.equal(tiling.tokens.gathered_order.sort().values, torch.arange(rows * cols))
    # uneven splits differ by at most one row / column of patches
    heights = [b[0][1] - b[0][0] for b in map(tiling.tile_bounds, range(tiling.n_tiles))]
    assert max(heights) - min(heights) <= patch[0]


# --- groups on 4 ranks --------------------------------------------------------------------------
MESHES = [MeshConfig(data=2, tensor=2), MeshConfig(data=2, domain=(1, 2)), MeshConfig(sample=2, domain=(2, 1)),
          MeshConfig(domain=(2, 1), tensor=2), MeshConfig()]


def describe_meshes(rank, world_size):
    out = []
    for config in MESHES:
        mesh = ProcessMesh.build(config)
        out.append(dict(
            coords=(mesh.data_rank, mesh.sample_rank, mesh.domain_rank, mesh.tensor_rank),
            groups={name: dist.get_process_group_ranks(group) for name, group in mesh.groups.items()},
            model_rank=mesh.model_rank, replica_rank=mesh.replica_rank))
    try:
        ProcessMesh.build(MeshConfig(data=3, tensor=2))
        error = None
    except MeshError as exc:
        error = str(exc)
    return out, error


def test_groups_on_four_ranks():
    results = spawn(describe_meshes, 4)
    for rank, (meshes, error) in enumerate(results):
        assert error is not None and "= 6 processes, but the world size is 4" in error
        for config, got in zip(MESHES, meshes):
            config = config.resolve(4)
            shape = (config.data, config.sample, config.domain_size, config.tensor)
            grid = torch.arange(4).reshape(shape)
            coords = tuple(int(c) for c in (grid == rank).nonzero()[0])  # tensor innermost, data outermost
            assert got["coords"] == coords, f"{config}: rank {rank}"
            d, s, i, j = coords
            expected = {"data": grid[:, s, i, j], "sample": grid[d, :, i, j], "domain": grid[d, s, :, j],
                        "tensor": grid[d, s, i, :], "model": grid[d, s].flatten(),
                        "replica": grid[:, :, i, j].flatten()}
            for name, ranks in expected.items():
                assert got["groups"][name] == ranks.tolist(), f"{config}: {name} group of rank {rank}"
            model_rank, replica_rank = i * config.tensor + j, d * config.sample + s
            assert (got["model_rank"], got["replica_rank"]) == (model_rank, replica_rank)
    # the brief's example, spelled out: data=2 x tensor=2 -> model groups {0,1},{2,3}; replica {0,2},{1,3}
    first = [meshes[0] for meshes, _ in results]
    assert [m["groups"]["model"] for m in first] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [m["groups"]["replica"] for m in first] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert len({tuple(m["coords"]) for m in first}) == 4
