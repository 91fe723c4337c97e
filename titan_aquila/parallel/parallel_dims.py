"""`ParallelDims`: the degrees of each parallelism, validated against the world size, and the device mesh.

Mesh layout (outermost first): dp_replicate x dp_shard x tp. FSDP2 shards over dp_shard (HSDP adds dp_replicate);
data loading uses the flattened "dp" = dp_replicate x dp_shard dimension; tensor parallelism is innermost so its
frequent collectives stay between neighbouring ranks (one node). Expert parallelism borrows its ranks from
dp_shard (torchtitan's design): ep must divide dp_shard, experts are sharded over "ep" and FSDP2 shards the
expert weights over the remaining dp_shard / ep ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from titan_aquila.errors import UserError


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    world_size: int
    world_mesh: object = field(default=None, repr=False)

    @classmethod
    def from_config(cls, p, world_size: int) -> "ParallelDims":
        for name in ("data_parallel_replicate_degree", "tensor_parallel_degree", "expert_parallel_degree"):
            if getattr(p, name) < 1:
                raise UserError(f"parallelism.{name} must be >= 1, got {getattr(p, name)}")
        dp_shard = p.data_parallel_shard_degree
        rest = p.data_parallel_replicate_degree * p.tensor_parallel_degree
        if dp_shard == -1:
            if world_size % rest:
                raise UserError(f"world size {world_size} is not divisible by data_parallel_replicate_degree x "
                                f"tensor_parallel_degree = {rest}")
            dp_shard = world_size // rest
        elif dp_shard < 1:
            raise UserError(f"parallelism.data_parallel_shard_degree must be >= 1 or -1, got {dp_shard}")
        dims = cls(p.data_parallel_replicate_degree, dp_shard, p.tensor_parallel_degree, p.expert_parallel_degree,
                   world_size)
        dims.validate()
        return dims

    def validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise UserError(f"parallel degrees dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp "
                            f"{self.tp} = {product} but the world size is {self.world_size}")
        if self.ep > 1 and self.dp_shard % self.ep:
            raise UserError(f"expert_parallel_degree {self.ep} must divide data_parallel_shard_degree "
                            f"{self.dp_shard} (expert parallelism borrows data-parallel ranks)")

    def build_mesh(self, device_type: str):
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        if self.ep > 1:
            # dp_shard = (dp_shard / ep) x ep: experts over "ep", expert weights FSDP-sharded over "dp_shard_mod_ep".
            ep_mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard // self.ep, self.ep, self.tp),
                                       mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep", "tp"))
            self.ep_mesh = ep_mesh
        self.world_mesh = mesh
        return mesh

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1 or self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def dp_rank(self) -> int:
        return 0 if self.world_mesh is None else self.world_mesh["dp"].get_local_rank()
