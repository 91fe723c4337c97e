"""Validation loss, and the growth audit: source vs grown model on the same held-out batches (AquilaMoE Tables 1-2).

    validation loss = sum of token cross-entropies / number of tokens, summed over data-parallel ranks
    audit           = {source loss, grown loss, max |logits_grown - logits_source|} before any training step
"""

from __future__ import annotations

import json
from pathlib import Path

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


@torch.no_grad()
def growth_audit(src_model, grown_model, batches, device, max_steps: int = -1, group=None) -> dict:
    """Losses of both models and the largest logit difference on the same batches (the grown model may be sharded:
    it is called like in training, on this rank's batches; the source is a plain local copy)."""
    src_model.eval()
    grown_model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # src loss sum, grown loss sum, tokens
    max_diff = torch.zeros((), dtype=torch.float64, device=device)
    for i, (inputs, labels) in enumerate(batches):
        if 0 <= max_steps <= i:  # -1 = all batches
            break
        inputs, labels = inputs.to(device), labels.to(device)
        src_logits, _ = src_model(inputs)
        dst_logits, _ = grown_model(inputs)
        flat = labels.flatten()
        sums[0] += F.cross_entropy(src_logits.float().flatten(0, 1), flat, reduction="sum").double()
        sums[1] += F.cross_entropy(dst_logits.float().flatten(0, 1), flat, reduction="sum").double()
        sums[2] += flat.numel()
        max_diff = torch.maximum(max_diff, (dst_logits.float() - src_logits.float()).abs().max().double())
    grown_model.train()
    _all_reduce(sums, group=group)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(max_diff, op=dist.ReduceOp.MAX, group=group)
    return {"source_loss": (sums[0] / sums[2]).item(), "grown_loss": (sums[1] / sums[2]).item(),
            "max_logit_diff": max_diff.item(), "tokens": int(sums[2].item())}


def write_audit(folder: str | Path, audit: dict) -> Path:
    path = Path(folder) / "growth_audit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(audit, indent=2) + "\n")
    tmp.replace(path)
    return path
