"""Validation loss, and the growth audit: source vs grown model on the same held-out batches (AquilaMoE Tables 1-2).

    validation loss = sum of token cross-entropies / number of tokens, summed over data-parallel ranks
    audit           = {source loss, grown loss, max |logits_grown - logits_source|} before any training step
"""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(x: torch.Tensor, op=None, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def validation_loss(model, batches, device, max_steps: int = -1, autocast=None, group=None) -> tuple[float, int]:
    """Mean token cross-entropy over `batches` (at most `max_steps` of them; -1 = all), across dp ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (inputs, labels) in enumerate(batches):
        if 0 <= max_steps <= i:
            break
        inputs, labels = inputs.to(device), labels.to(device)
        with autocast or torch.autocast(device.type, enabled=False):
            logits, _ = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(labels.numel(), dtype=torch.float64, device=device)])
    model.train(was_training)
    _all_reduce(total, group=group)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan"), int(total[1].item())
