"""Validation loss, and the growth audit: source vs grown model on the same held-out batches (AquilaMoE Tables 1-2).

    validation loss = sum of token cross-entropies / number of (unmasked) tokens, summed over data-parallel ranks
    audit           = {source loss, grown loss, max |logits_grown - logits_source|} before any training step
"""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_aquila.losses import IGNORE_INDEX


def _all_reduce(x: torch.Tensor, op=None, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def validation_loss(model, batches, device, max_steps: int = -1, autocast=None, group=None,
                    head=None) -> tuple[float, int]:
    """Mean token cross-entropy over `batches` (at most `max_steps` of them; -1 = all), across dp ranks.

    `head(labels)`, if given, builds the training step's fused output head (titan_aquila/losses.py; under tensor
    parallelism the vocab-parallel one): the batch's mean CE then comes out of the model's forward without
    [tokens, vocab] logits, and under TP without gathering them, the same arithmetic as the training loss."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i, (inputs, labels) in enumerate(batches):
        if 0 <= max_steps <= i:
            break
        inputs, labels = inputs.to(device), labels.to(device)
        n_valid = (labels != IGNORE_INDEX).sum()  # (the data loaders mask no labels; a caller may)
        with autocast or torch.autocast(device.type, enabled=False):
            if head is not None:
                (ce, _), _ = model(inputs, head=head(labels))
                loss = ce.double() * n_valid  # the mean over valid labels, back to a sum
            else:
                logits, _ = model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
        total += torch.stack([loss.double(), n_valid.to(torch.float64)])
    model.train(was_training)
    _all_reduce(total, group=group)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan"), int(total[1].item())
