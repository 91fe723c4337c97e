"""Expert parallelism: experts sharded over the "ep" ranks, tokens moved with all-to-all.

With ep ranks and E experts, ep rank r owns experts [r E/ep, (r+1) E/ep): the stacked weights w1/w3 [E, Fe, D] and
w2 [E, D, Fe] become DTensors with Shard(0) on the "ep" mesh, so state dicts, DCP checkpoints and the growth loader
still see the usual [E, ...] tensors. One MoE step on ep rank r (rows of x arrive sorted by expert id):

    counts[E]         rows this rank sends to each expert
    a2a(counts)    -> recv[s, j]: rows source rank s sends to my local expert j          (recv is [ep, E/ep])
    a2a(x)         -> rows for my experts, in (source, expert) order; regroup to (expert, source) order
    grouped SwiGLU on my E/ep experts with counts recv.sum(0); inverse regroup; a2a back -> rows in the input order

With capacity padding (moe.pad_to_capacity, capacity C per expert, computed from each rank's own tokens as Megatron
does) every (source rank, expert) block holds exactly C rows, so the counts exchange and its host synchronisation are
skipped: each rank sends and receives (E/ep)·C rows per peer, and the local experts run as one batched GEMM per weight
on [E/ep, ep·C, D].

Both row all-to-alls are `all_to_all_single` with uneven (possibly zero) splits (list-form all_to_all
raises on gloo with torch 2.13); the autograd version sends gradients back the same way. The router, the aux losses and
`tokens_per_expert` run on each rank's own tokens before dispatch, so the counts stay per expert [E] on every rank
and the trainer's all-reduce over "dp" gives the global load.

Gradient scale: each rank's loss is the mean over its own tokens, and FSDP averages gradients over the ranks it
reduces over. An expert's gradient arrives through the all-to-all as the SUM over the ep ranks' losses, so it is
multiplied by 1/ep in backward (`_ScaleGrad`); FSDP then averages over "dp_shard_mod_ep" (x "dp_replicate"), which
together gives (1/dp) sum over all ranks, the same as for every other weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from titan_aquila.logging import logger
from titan_aquila.models.capacity import padded_expert_swiglu
from titan_aquila.models.moe import expert_swiglu, grouped_mm_supported


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward, gradient times `scale` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class ExpertParallelExperts(nn.Module):
    """Takes over a `GroupedExperts`' parameters (same names w1/w2/w3, so FQNs do not change) as Shard(0)
    DTensors on the ep mesh, and computes `forward(x_sorted, counts)` with all-to-all dispatch."""

    def __init__(self, experts: nn.Module, ep_mesh):
        super().__init__()
        self.ep, self.group = ep_mesh.size(), ep_mesh.get_group()
        self.use_grouped_mm = experts.use_grouped_mm
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            self.register_parameter(name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)])))

    @torch.compiler.disable  # data-dependent split sizes (.tolist()) and collectives: keep this part eager
    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        ep, local = self.ep, counts.numel() // self.ep
        w = [_ScaleGrad.apply(p.to_local() if isinstance(p, DTensor) else p, 1.0 / ep).to(x_sorted.dtype)
             for p in (self.w1, self.w2, self.w3)]
        if capacity is not None:
            return self._forward_padded(x_sorted, w, local, capacity)
        counts = counts.to(torch.int64)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(ep, local)
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_sorted.contiguous(), recv_splits, send_splits, self.group)

        # Rows arrive as blocks (source s, expert j); a stable sort by j regroups them expert-major.
        block = torch.repeat_interleave(torch.arange(ep * local, device=recv.device), recv.flatten())
        order = torch.argsort(block % local, stable=True).to(x_recv.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)

        grouped = self.use_grouped_mm and grouped_mm_supported(x_recv)
        y = expert_swiglu(x_recv[order], w[0], w[1], w[2], recv.sum(0).to(x_recv.device), grouped)
        return all_to_all_single_autograd(y[inverse].contiguous(), send_splits, recv_splits, self.group)

    def _forward_padded(self, x_pad: torch.Tensor, w: list[torch.Tensor], local: int, capacity: int) -> torch.Tensor:
        """Rows: E groups of exactly `capacity` (expert-major), the same C on every rank (equal local batches)."""
        ep, D = self.ep, x_pad.shape[-1]
        splits = [local * capacity] * ep
        x_recv = all_to_all_single_autograd(x_pad.contiguous(), splits, splits, self.group)
        # Arrived as [source, local expert, C]; each local expert's ep·C rows side by side: [local, ep·C, D].
        x_e = x_recv.view(ep, local, capacity, D).transpose(0, 1).reshape(local, ep * capacity, D)
        y = padded_expert_swiglu(x_e, w[0], w[1], w[2])
        y = y.view(local, ep, capacity, D).transpose(0, 1).reshape(ep * local * capacity, D)
        return all_to_all_single_autograd(y, splits, splits, self.group)


def apply_ep(model: nn.Module, ep_mesh) -> None:
    """Replace every MoE layer's experts with `ExpertParallelExperts` over the 1-D `ep_mesh` (its size divides
    n_experts: checked by titan_aquila/config/validate.py)."""
    ep, n = ep_mesh.size(), 0
    for block in model.layers.values():
        if block.moe_enabled:
            block.moe.experts = ExpertParallelExperts(block.moe.experts, ep_mesh)
            n += 1
    logger.info(f"[parallelize] expert parallel over {ep} ranks in {n} MoE layers: {model.args.n_experts // ep} of "
                f"{model.args.n_experts} experts per rank, all-to-all dispatch")


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
