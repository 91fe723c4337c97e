"""Expert parallelism: experts sharded over the "ep" ranks, tokens moved with all-to-all.

With ep ranks and E experts, rank r owns experts [r*E/ep, (r+1)*E/ep) (DTensor Shard(0) on the expert dim, so DCP
checkpoints and the growth loader see the usual [E, ...] tensors). One MoE step on rank r:

    counts[E]   tokens this rank sends to each expert (rows of x arrive sorted by expert id)
    a2a(counts) -> recv[ep, E/ep]: tokens each source rank sends to each of my experts
    a2a(x)      rows for my experts, ordered (source rank, expert) -> regrouped (expert, source rank)
    grouped SwiGLU on my experts -> the inverse regrouping -> a2a back -> rows in the original order

Design: EP borrows the data-parallel shard ranks (torchtitan's choice) and here uses all of them: ep must equal
data_parallel_shard_degree, without TP or HSDP. The non-expert weights are FSDP2-sharded over the same ranks; the
expert weights are not (each already lives on exactly one rank). Every rank's loss is the mean over its own tokens
and the all-to-all backward sums the contributions of all ep ranks into an expert's gradient, so expert gradients
are divided by ep to match FSDP's averaged gradients of the other weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from titan_aquila.errors import UserError
from titan_aquila.metrics import rank0_print
from titan_aquila.models.moe import expert_swiglu, grouped_mm_supported


def validate_ep(args, dims) -> None:
    if args.n_experts == 0:
        raise UserError("expert_parallel_degree > 1 needs an MoE model (model.n_experts > 0)")
    if args.n_experts % dims.ep:
        raise UserError(f"expert_parallel_degree {dims.ep} does not divide model.n_experts ({args.n_experts})")
    if dims.ep != dims.dp_shard or dims.tp > 1 or dims.dp_replicate > 1:
        raise UserError(f"expert_parallel_degree ({dims.ep}) must equal data_parallel_shard_degree "
                        f"({dims.dp_shard}), without tensor parallelism or HSDP replication")


class ExpertParallelForward:
    """Replaces `GroupedExperts.forward` with the all-to-all version; the parameters stay on the experts module."""

    def __init__(self, experts: nn.Module, mesh):
        self.mesh, self.group = mesh, mesh.get_group()
        self.ep = mesh.size()
        self.experts = [experts]  # not an attribute cycle the module tree would follow

    def __call__(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        experts = self.experts[0]
        E = counts.numel()
        local = E // self.ep
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(self.ep, local)  # recv[s, j]: rows from rank s for my expert j
        send_splits = counts.view(self.ep, local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)
        # Regroup rows from (source, expert) order to (expert, source) order for the grouped GEMM.
        block_start = torch.cumsum(recv.flatten(), 0) - recv.flatten()  # start of block (s, j) in x_recv
        order = torch.cat([torch.arange(int(block_start[s * local + j]), int(block_start[s * local + j] + recv[s, j]))
                           for j in range(local) for s in range(self.ep)]) if x_recv.shape[0] else \
            torch.zeros(0, dtype=torch.long)
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (experts.w1, experts.w2, experts.w3))
        grouped = experts.use_grouped_mm and grouped_mm_supported(x_recv)
        y_local = expert_swiglu(x_recv[order.to(x_recv.device)], w1, w2, w3, recv.sum(0), grouped)
        y_recv = torch.empty_like(y_local).index_copy(0, order.to(y_local.device), y_local)
        return all_to_all_single_autograd(y_recv, send_splits, recv_splits, self.group)


def apply_ep(model: nn.Module, dims) -> None:
    validate_ep(model.args, dims)
    mesh = dims.world_mesh["dp_shard"]
    ep = mesh.size()
    for block in model.layers.values():
        moe = getattr(block, "moe", None)
        if moe is None:
            continue
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            param = nn.Parameter(distribute_tensor(full.data, mesh, [Shard(0)]))
            param.register_hook(lambda g: g / ep)  # see the module docstring
            param._titan_expert_parallel = True
            setattr(experts, name, param)
        experts.forward = ExpertParallelForward(experts, mesh)
    rank0_print(f"[parallelize] expert parallel over {ep} ranks: {model.args.n_experts // ep} experts per rank, "
                f"all-to-all dispatch")


def expert_parallel_params(model: nn.Module) -> set:
    """Parameters FSDP must leave alone (already sharded over the expert dimension)."""
    return {p for p in model.parameters() if getattr(p, "_titan_expert_parallel", False)}
