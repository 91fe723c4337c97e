"""AdamW with decoupled weight decay on matrices only, and the warmup -> (stable) -> decay LR schedule.

LR multiplier at optimizer step s (1-based, the step about to be taken), warmup W, total S, decay steps D:

    warmup   s <= W:           (s / (W + 1))                        never 0, so step 1 already learns
    stable   W < s <= S - D:   1                                    (WSD; D = S - W when decay_ratio is unset)
    decay    progress p = (s - (S - D)) / D in (0, 1]:
             linear  1 - p      sqrt  1 - sqrt(p)      cosine  (1 + cos(pi p)) / 2
    floor    m + (1 - m) * decay,   m = lr_scheduler.min_lr_factor
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from titan_aquila.logging import logger


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D weights (matrices, stacked experts, embeddings); none on norms and biases, whose
    scale carries meaning (decaying an RMSNorm gain toward 0 shrinks the layer's output).

    Parameters are also grouped by tensor type and mesh: under TP some are DTensors and some (replicated ones) are
    not, and the foreach kernels cannot mix the two in one call."""
    groups: dict[tuple, dict] = {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mesh = (p.device_mesh, p.placements) if isinstance(p, DTensor) else None
        decay = p.ndim >= 2
        key = (not decay, str(mesh))
        groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decay else 0.0})["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, o) -> torch.optim.Optimizer:
    """AdamW from the `[optimizer]` section `o` (its name is 'AdamW': the config accepts nothing else)."""
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[o.implementation]
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             **impl)


def lr_multiplier(step: int, warmup: int, total: int, decay_ratio: float | None, decay_type: str,
                  min_lr_factor: float) -> float:
    """The schedule of the module docstring; `step` counts from 1."""
    warmup = min(warmup, total)
    if step <= warmup:
        return step / (warmup + 1)
    decay_steps = total - warmup if decay_ratio is None else max(round(total * decay_ratio), 1)
    decay_start = total - decay_steps
    if step <= decay_start or decay_steps <= 0:
        return 1.0
    p = min((step - decay_start) / decay_steps, 1.0)
    if decay_type == "linear":
        decay = 1.0 - p
    elif decay_type == "sqrt":
        decay = 1.0 - math.sqrt(p)
    elif decay_type == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ValueError(f"unknown decay_type {decay_type!r}")  # the config allows only the three above
    return min_lr_factor + (1.0 - min_lr_factor) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, s, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of the `[lr_scheduler]` section `s` over `total_steps` (training.steps). LambdaLR calls the
    lambda with the number of steps taken so far (0 before the first step)."""
    if s.warmup_steps > total_steps:
        logger.warning(f"lr_scheduler.warmup_steps {s.warmup_steps} > training.steps {total_steps}: the warmup is "
                       f"clamped to {total_steps} steps (the learning rate never reaches optimizer.lr)")

    def fn(steps_done: int) -> float:
        return lr_multiplier(steps_done + 1, s.warmup_steps, total_steps, s.decay_ratio, s.decay_type, s.min_lr_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every parameter group's LR from this scheduler's own schedule at its current step.

    After a resume the optimizer's LR is the one the saved run's schedule set after its last step; when the resumed
    run has another schedule (e.g. training.steps 10 -> 20) the next step must use the new one. With an unchanged
    schedule this writes the very same value (base_lr * multiplier(steps done)), so resuming stays bit-exact."""
    groups = scheduler.optimizer.param_groups
    for group, base_lr, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
