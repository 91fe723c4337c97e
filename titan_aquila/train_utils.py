"""Small pieces of the training step that touch several ranks: gradient norm, loss averaging, expert load."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (inf = no clipping) and return the global L2 norm of all gradients as a plain tensor.
    With FSDP2/TP the gradients are DTensors and `clip_grad_norm_` reduces across their meshes."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def reduce_mean(x: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over the data-parallel ranks (each saw the same number of tokens)."""
    if _distributed():
        x = x.clone()
        dist.all_reduce(x, group=group)
        x /= dist.get_world_size(group)
    return x


def moe_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer id -> MoE module, found by name so wrappers (compile, AC, FSDP) do not matter."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith(".moe") and hasattr(module, "tokens_per_expert"):
            out[int(name.split("layers.")[1].split(".")[0])] = module
    return out


@torch.no_grad()
def collect_expert_load(model: nn.Module, group=None) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert since the last call, summed over data-parallel ranks; resets the counters."""
    load = {}
    for layer, moe in sorted(moe_modules(model).items()):
        counts = moe.tokens_per_expert.detach().clone().float()
        if _distributed():
            dist.all_reduce(counts, group=group)
        moe.tokens_per_expert.zero_()
        load[layer] = counts.cpu()
    return load


@torch.no_grad()
def update_expert_bias(model: nn.Module, load: dict[int, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: b_i += rate * sign(mean load - load_i). Every rank applies the same
    update from the same globally-reduced counts, so the (replicated) bias stays identical everywhere."""
    for layer, moe in moe_modules(model).items():
        counts = load[layer].to(moe.expert_bias.device)
        moe.expert_bias.add_(rate * torch.sign(counts.mean() - counts))
