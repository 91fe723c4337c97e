"""`ParallelDims`: the degree of each parallelism, validated against the world size, and the device meshes.

    world = dp_replicate x dp_shard x tp                     (ep borrows ranks, it adds none)

Mesh layout (outermost first): ("dp_replicate", "dp_shard", "tp"), plus the flattened "dp" = dp_replicate x dp_shard
(`dims.dp_mesh`) that data loading and loss averaging use (TP ranks of one group read the same batch). FSDP2 shards over dp_shard
(HSDP: shard over dp_shard, replicate over dp_replicate). TP is innermost so its per-layer collectives stay between
neighbouring ranks (one node).

Expert parallelism (torchtitan's design): EP borrows the data-parallel shard ranks. With ep | dp_shard the
dp_shard dimension is unflattened into ("dp_shard_mod_ep", "ep"), giving `ep_mesh` =
("dp_replicate", "dp_shard_mod_ep", "ep", "tp") over the same ranks:

    expert weights [E, ...]   Shard(0) over "ep" (E/ep experts per rank), FSDP2 over "dp_shard_mod_ep" (HSDP with
                              "dp_replicate"); not FSDP-sharded at all when dp_shard_mod_ep = dp_replicate = 1
    every other weight        FSDP2 over "dp_shard" exactly as without EP
    tokens                    all-to-all within "ep"; a TP group sees replicated MoE inputs, so each TP rank runs
                              the same dispatch on its own "ep" group (experts are replicated across TP)

World size 1: no mesh, nothing is applied.
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
    ep_mesh: object = field(default=None, repr=False)
    dp_mesh: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_config(cls, p, world_size: int) -> "ParallelDims":
        """From `cfg.parallelism` (its ranges checked by JobConfig.validate); data_parallel_shard_degree -1 takes
        the ranks the other degrees leave."""
        dp_shard = p.data_parallel_shard_degree
        rest = p.data_parallel_replicate_degree * p.tensor_parallel_degree
        if dp_shard == -1:
            if world_size % rest:
                raise UserError(f"world size {world_size} is not divisible by data_parallel_replicate_degree "
                                f"{p.data_parallel_replicate_degree} x tensor_parallel_degree "
                                f"{p.tensor_parallel_degree} = {rest}")
            dp_shard = world_size // rest
        return cls(p.data_parallel_replicate_degree, dp_shard, p.tensor_parallel_degree, p.expert_parallel_degree,
                   world_size)

    def validate(self) -> None:
        product = self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise UserError(f"parallel degrees data_parallel_replicate {self.dp_replicate} x data_parallel_shard "
                            f"{self.dp_shard} x tensor_parallel {self.tp} = {product}, but the world size is "
                            f"{self.world_size}")
        if self.ep > 1 and self.dp_shard % self.ep:
            raise UserError(f"expert_parallel_degree {self.ep} must divide data_parallel_shard_degree "
                            f"{self.dp_shard} (expert parallelism borrows the data-parallel shard ranks)")

    def build_mesh(self, device_type: str):
        """Build (and keep) the world mesh, and the EP mesh when ep > 1; None for a single process."""
        if self.world_size == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        # Keep the flattened mesh: slicing a flattened dim from the root (world_mesh["dp"]) still works but is
        # deprecated upstream, so prefer `dims.dp_mesh`.
        self.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        if self.ep > 1:
            # Same ranks, dp_shard split as (dp_shard / ep) x ep; the rank map is shared, so FSDP2 can combine
            # "dp_shard_mod_ep" with a DTensor on "ep" into one 2-D sharding.
            self.ep_mesh = mesh._unflatten("dp_shard", (self.dp_shard // self.ep, self.ep),
                                           ("dp_shard_mod_ep", "ep"))
        self.world_mesh = mesh
        return mesh

    # ---- degrees and switches --------------------------------------------------------------------------------
    @property
    def dp_degree(self) -> int:
        """Data-parallel degree: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1 or self.dp_replicate > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_mesh(self):
        """Mesh the non-expert weights are FSDP2-sharded over ("dp_shard", or 2-D for HSDP)."""
        m = self.world_mesh
        return m["dp_replicate", "dp_shard"] if self.hsdp_enabled else m["dp_shard"]

    @property
    def expert_fsdp_mesh(self):
        """Mesh the expert weights are FSDP2-sharded over under EP; None without EP or when no rank is left."""
        if not self.ep_enabled or (self.dp_shard_mod_ep == 1 and not self.hsdp_enabled):
            return None
        m = self.ep_mesh
        return m["dp_replicate", "dp_shard_mod_ep"] if self.hsdp_enabled else m["dp_shard_mod_ep"]

    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which batch slice it reads)."""
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()

    def describe(self) -> str:
        return (f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp}"
                f"{f' (ep {self.ep} within dp_shard)' if self.ep > 1 else ''} = {self.world_size} ranks")
