"""The process mesh: data x sample x domain x tensor, and the groups derived from it.

``init_device_mesh(device, (data, sample, domain, tensor))`` with tensor innermost (fast
links) and data outermost. The domain axis is itself a 2-D tile grid ``(lat, lon)``.
Derived groups:

* **tensor** / **domain**: the two model-parallel axes the Jigsaw layers communicate over;
* **model** = domain x tensor: one model replica; every parameter element lives on
  exactly one of its ranks;
* **replica** = data x sample: the ranks holding the same parameter shard; gradients are
  averaged and ZeRO partitions optimizer state here.

The serial mesh (:meth:`ProcessMesh.serial`) has no process groups at all: every
collective is the identity, so the model built on it is plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


class MeshError(ValueError):
    """A mesh that cannot be built; the message names the axis and sizes."""


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class MeshConfig:
    data: int | None = None  # None: whatever the world size leaves after the other axes
    sample: int = 1
    domain: tuple[int, int] = (1, 1)  # tile grid (latitude tiles, longitude tiles)
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in ("sample", "tensor"):
            if not _positive_int(getattr(self, name)):
                raise MeshError(f"mesh.{name} = {getattr(self, name)!r}: expected a positive integer")
        grid = self.domain if isinstance(self.domain, (tuple, list)) else ()
        if len(grid) != 2 or not all(_positive_int(d) for d in grid):
            raise MeshError(f"mesh.domain = {self.domain!r}: expected a tile grid of two positive integers "
                            f"(latitude tiles, longitude tiles)")
        if self.data is not None and not _positive_int(self.data):
            raise MeshError(f"mesh.data = {self.data!r}: expected a positive integer or null (inferred)")

    @property
    def domain_size(self) -> int:
        return self.domain[0] * self.domain[1]

    @property
    def model_size(self) -> int:
        return self.domain_size * self.tensor

    def to_json(self) -> dict:
        return {"data": self.data, "sample": self.sample, "domain": list(self.domain), "tensor": self.tensor,
                "model_size": self.model_size}

    def resolve(self, world_size: int) -> "MeshConfig":
        """This mesh with ``data`` filled in, checked against ``world_size``."""
        per_data = self.sample * self.model_size
        domain = f"{self.domain_size} (tile grid {self.domain[0]}x{self.domain[1]})"
        if self.data is None:
            if world_size % per_data:
                raise MeshError(f"world size {world_size} is not divisible by sample x domain x tensor = "
                                f"{self.sample} x {domain} x {self.tensor} = {per_data}; expected a "
                                f"multiple of {per_data} processes")
            return MeshConfig(world_size // per_data, self.sample, tuple(self.domain), self.tensor)
        if self.data * per_data != world_size:
            raise MeshError(f"mesh data x sample x domain x tensor = {self.data} x {self.sample} x "
                            f"{domain} x {self.tensor} = {self.data * per_data} processes, but the "
                            f"world size is {world_size}; expected the product to equal the world size")
        return self


@dataclass
class ProcessMesh:
    config: MeshConfig
    data_rank: int = 0
    sample_rank: int = 0
    domain_rank: int = 0
    tensor_rank: int = 0
    device_mesh: object = None
    groups: dict[str, object] = field(default_factory=dict)  # name -> ProcessGroup (absent when serial)

    @classmethod
    def serial(cls) -> "ProcessMesh":
        return cls(MeshConfig(1, 1, (1, 1), 1))

    @classmethod
    def build(cls, config: MeshConfig, device_type: str = "cpu") -> "ProcessMesh":
        """Build the mesh over the initialised default process group (all ranks call this)."""
        if not dist.is_initialized():
            processes = (config.data or 1) * config.sample * config.model_size
            if processes == 1:
                return cls.serial()
            raise MeshError(f"mesh data x sample x domain x tensor needs {processes} processes but "
                            f"torch.distributed is not initialised; start with the deepspeed launcher or torchrun")
        config = config.resolve(dist.get_world_size())
        shape = (config.data, config.sample, config.domain_size, config.tensor)
        names = ("data", "sample", "domain", "tensor")
        device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        coords = device_mesh.get_coordinate()
        groups = {name: device_mesh.get_group(name) for name in names}
        grid = torch.arange(dist.get_world_size()).reshape(shape)
        groups["model"] = _subgroup([grid[d, s].flatten().tolist()
                                     for d in range(shape[0]) for s in range(shape[1])])
        groups["replica"] = _subgroup([grid[:, :, i, j].flatten().tolist()
                                       for i in range(shape[2]) for j in range(shape[3])])
        return cls(config, *coords, device_mesh=device_mesh, groups=groups)

    # groups: None means "this axis has one rank" and makes every collective the identity
    def group(self, name: str):
        group = self.groups.get(name)
        return group if group is not None and dist.get_world_size(group) > 1 else None

    @property
    def tensor_group(self):
        return self.group("tensor")

    @property
    def domain_group(self):
        return self.group("domain")

    @property
    def model_group(self):
        return self.group("model")

    @property
    def replica_group(self):
        return self.group("replica")

    @property
    def model_rank(self) -> int:
        return self.domain_rank * self.config.tensor + self.tensor_rank

    @property
    def replica_rank(self) -> int:
        return self.data_rank * self.config.sample + self.sample_rank

    @property
    def replicas(self) -> int:
        return self.config.data * self.config.sample

    def describe(self) -> str:
        c = self.config
        return (f"mesh data={c.data} sample={c.sample} domain={c.domain[0]}x{c.domain[1]} tensor={c.tensor} "
                f"({c.data * c.sample * c.model_size} processes)")


def _subgroup(rank_lists: list[list[int]]):
    """The group among ``rank_lists`` that holds this rank (every rank creates all of them)."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine
