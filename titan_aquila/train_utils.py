"""Small pieces of the training step: the loss, and what touches several ranks (gradient norm, loss averaging,
expert load and the aux-loss-free expert bias)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def training_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, aux_2: torch.Tensor, load_balance_coeff: float,
                  z_loss_coeff: float, z_on_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective of one micro-batch and its detached parts [ce, load_balance, z]:

        loss = CE(fp32 logits) + load_balance_coeff * lb + z_loss_coeff * z
        z    = the model's router z-loss (z_loss_type 'router_lse' | 'router_max'), or with `z_on_output`
               (z_loss_type 'output_max', Baichuan 2's max-z on the LM head) the mean over tokens of (max_v logit)^2

    CE is the mean over the micro-batch's tokens; every micro-batch holds the same number of tokens (packed
    windows), so the mean of micro-batch losses is the mean over the whole batch. (The fused path of
    titan_aquila/losses.py computes CE and the output z without the logits and calls `combine_loss`.)"""
    logits = logits_BTV.float()  # fp32 softmax even under bf16 autocast
    ce = F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten())
    z_out = logits.max(dim=-1).values.pow(2).mean() if z_on_output else None
    return combine_loss(ce, z_out, aux_2, load_balance_coeff, z_loss_coeff)


def combine_loss(ce: torch.Tensor, z_out: torch.Tensor | None, aux_2: torch.Tensor, load_balance_coeff: float,
                 z_loss_coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`training_loss` from its parts: z is the output-logit z (`z_out`, z_loss_type 'output_max') when given,
    else the router's."""
    lb, z = aux_2[0], aux_2[1]
    if z_out is not None:  # the model's router z is 0 for this type
        z = z_out
    loss = ce + load_balance_coeff * lb + z_loss_coeff * z
    return loss, torch.stack([ce, lb, z]).detach()


def aux_coefficients(moe_cfg, args) -> tuple[float, float, bool]:
    """(load_balance_coeff, z_loss_coeff, z_on_output) for `training_loss`, given the model's aux = the per-layer
    MEANS [mean_l lb_l, mean_l z_l] over its n_L MoE layers:

        moe.aux_loss_reduction 'sum' (default; Megatron, on which AquilaMoE's FlagScale runs: every MoE layer adds
            its own terms):  loss = CE + sum_l (c_lb * lb_l + c_z * z_l) = CE + (n_L c_lb) mean_l lb_l + (n_L c_z) mean_l z_l
        'mean':              loss = CE + c_lb * mean_l lb_l + c_z * mean_l z_l

    z_loss_type 'output_max' (Baichuan 2's max-z on the LM head) is one term, not per layer: its coefficient is never
    scaled. The logged parts stay per-layer means (load balance 1 = uniform routing) whatever the reduction."""
    layers = max(len(args.moe_layer_ids), 1) if moe_cfg.aux_loss_reduction == "sum" else 1
    on_output = args.z_loss_type == "output_max"
    return moe_cfg.load_balance_coeff * layers, moe_cfg.z_loss_coeff * (1 if on_output else layers), on_output


def full_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (inf = no clipping) and return the global L2 norm of all gradients as a plain tensor.

    Gradients may live on different meshes (FSDP2 x TP DTensors, FSDP-only DTensors for parameters TP replicates,
    plain tensors): the squared norm of each group is reduced over its own mesh, and the groups are summed."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    coef = max_norm / (total.item() + 1e-6)  # a Python float multiplies plain tensors and DTensors alike
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


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
def collect_expert_load(model: nn.Module, group=None, buffer: str = "tokens_per_expert") -> dict[int, torch.Tensor]:
    """Tokens routed to each expert since the last call, summed over data-parallel ranks; resets the counters.
    buffer="tokens_dropped": the assignments each expert dropped at capacity instead."""
    load = {}
    for layer, moe in sorted(moe_modules(model).items()):
        counts = getattr(moe, buffer).detach().clone().float()
        if _distributed():
            dist.all_reduce(counts, group=group)
        getattr(moe, buffer).zero_()
        load[layer] = counts.cpu()
    return load


def load_fractions(load: dict[int, torch.Tensor]) -> dict[int, list[float]]:
    """layer -> each expert's share of the routed (token, slot) pairs."""
    return {layer: (c / c.sum().clamp(min=1)).tolist() for layer, c in load.items()}


def drop_fractions(dropped: dict[int, torch.Tensor], load: dict[int, torch.Tensor]) -> dict[int, float]:
    """layer -> fraction of its routed (token, slot) assignments dropped at capacity (same window as `load`)."""
    return {layer: (d.sum() / load[layer].sum().clamp(min=1)).item() for layer, d in dropped.items()}


@torch.no_grad()
def update_expert_bias(model: nn.Module, load: dict[int, torch.Tensor], rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: b_i += rate * sign(mean load - load_i). Every rank applies the same
    update from the same globally-reduced counts, so the (replicated) bias stays identical everywhere."""
    for layer, moe in moe_modules(model).items():
        counts = load[layer].to(moe.expert_bias.device)
        moe.expert_bias.add_(rate * torch.sign(counts.mean() - counts))
