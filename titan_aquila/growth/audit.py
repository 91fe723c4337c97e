"""The growth audit: source vs grown model on the same held-out batches, before any update (AquilaMoE Tables 1-2).

    audit = {source loss, grown loss, max |logits_grown - logits_source|} over the same tokens

A function-preserving growth shows equal losses and a logit difference at float rounding level. With a capacity
factor (moe.capacity_factor) the grown MoE drops the assignments over its experts' capacity, so even an exact
upcycling differs from its source: the audit then also reports each MoE layer's fraction of dropped assignments.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_aquila.checkpoint.storage import read_model_state_dict, resolve_checkpoint_dir
from titan_aquila.checkpoint.weights import model_tensors, write_tensor
from titan_aquila.evaluate import _all_reduce
from titan_aquila.logging import logger
from titan_aquila.models.aquila import build_model
from titan_aquila.parallel.dist_utils import world_info
from titan_aquila.metrics import drop_summary
from titan_aquila.train_utils import collect_expert_load, drop_fractions, load_fractions


@torch.no_grad()
def growth_audit(src_model, grown_model, batches, device, max_steps: int = -1, group=None) -> dict:
    """Losses of both models and the largest logit difference on the same batches (the grown model may be sharded:
    it is called like in training, on this rank's batches; so is the source, sharded the same way or local)."""
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


@dataclass
class GrowthAudit:
    """What the audit found (saved as <dump_folder>/growth_audit.json, with `expert_load`'s keys as strings)."""

    methods: str
    source_loss: float
    grown_loss: float
    max_logit_diff: float
    tokens: int
    expert_load: dict[int, list[float]] = field(default_factory=dict)
    """MoE layer -> each expert's share of the audit tokens' routing slots (empty for a dense model)."""
    dropped_fraction: dict[int, float] = field(default_factory=dict)
    """MoE layer -> fraction of its assignments dropped at capacity (only with moe.capacity_factor)."""

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("expert_load", "dropped_fraction"):
            d[key] = {str(k): v for k, v in getattr(self, key).items()}
            if not d[key]:
                del d[key]
        return d

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / "growth_audit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path


def source_mesh(dims):
    """The mesh the audit's source is FSDP2-sharded over: the grown model's FSDP shard ranks times its TP ranks (TP
    ranks read the same batches, so they run the source's forwards in step, and the source's heads need not divide
    the TP degree); replicated over dp_replicate, like the grown model under HSDP. None in one process."""
    if dims is None or not (dims.fsdp_enabled or dims.tp_enabled):
        return None
    names = tuple(n for n, size in (("dp_shard", dims.dp_shard), ("tp", dims.tp)) if size > 1)
    if not names:  # dp_replicate only: nothing to shard over
        return None
    mesh = dims.world_mesh[names]
    return mesh._flatten("audit_source") if len(names) > 1 else mesh


def build_source(plan, src_dir: Path, device, dims=None) -> torch.nn.Module:
    """The source model, FSDP2-sharded (float32, reshard after forward) so that the audit never holds a full second
    model per rank: a meta build, then its tensors read from the checkpoint a layer at a time into the local shards.
    """
    # The source runs with the job's capacity setting too (a dense source has no experts to drop from).
    src = build_model(plan.src_args.replace(capacity_factor=plan.dst_args.capacity_factor,
                                            pad_to_capacity=plan.dst_args.pad_to_capacity), device="meta")
    mesh = source_mesh(dims)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in src.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(src, mesh=mesh)
    src.to_empty(device=device)
    targets = model_tensors(src)
    layers: dict[str, list[str]] = {}
    for name in targets:  # one read per layer: a layer's tensors are small, one read per tensor is slow
        layers.setdefault(name.split(".")[1] if name.startswith("layers.") else "", []).append(name)
    for names in layers.values():
        for name, value in read_model_state_dict(src_dir, keys=names, check=False).items():
            write_tensor(name, targets[name], value)
    with torch.no_grad():
        src.init_buffers()
    return src


def run_growth_audit(plan, source_path: str, audit_steps: int, model, val_loader, device, dp_group,
                     dump_folder: str, dims=None) -> GrowthAudit:
    """Source vs freshly grown model on the same held-out batches, before any update (logged, and saved to
    <dump_folder>/growth_audit.json): a function-preserving growth shows equal losses and ~0 logit difference."""
    t0 = time.perf_counter()
    logger.info(f"growth audit ({plan.describe()}) on {'all' if audit_steps < 0 else audit_steps} validation batches")
    src = build_source(plan, resolve_checkpoint_dir(source_path), device, dims)
    numbers = growth_audit(src, model, val_loader, device, audit_steps, group=dp_group)
    del src
    gc.collect()  # FSDP's hooks make reference cycles: without a collection the sharded source would stay alive
    # The grown model's expert counts from the audit batches (also resets them before training step 1).
    load = collect_expert_load(model, dp_group)
    drops = drop_fractions(collect_expert_load(model, dp_group, "tokens_dropped"), load)
    audit = GrowthAudit(plan.describe(), **numbers, expert_load=load_fractions(load),
                        dropped_fraction=drops if load and plan.dst_args.capacity_factor else {})
    used = [sum(x > 0 for x in f) for f in audit.expert_load.values()]
    capacity = f"  capacity factor {plan.dst_args.capacity_factor}: {drop_summary(drops)}" \
        if audit.dropped_fraction else ""
    logger.info(f"growth audit ({audit.methods}): source loss {audit.source_loss:.4f}  grown loss "
                f"{audit.grown_loss:.4f}  max |logit diff| {audit.max_logit_diff:.3e}"
                f"{f'  experts used per MoE layer {min(used)}..{max(used)} of {plan.dst_args.n_experts}' if used else ''}"
                f"{capacity}  ({time.perf_counter() - t0:.2f}s)")
    if world_info()[0] == 0:
        audit.write(dump_folder)
    return audit
