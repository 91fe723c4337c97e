"""Write a full (or lazy) state dict into a possibly sharded model, each rank building only its local shards.

For a parameter that is a DTensor (FSDP2 / TP / EP), each rank builds only its local shard: the shard's global
offset and shape come from `compute_local_shape_and_global_offset(global_shape, mesh, placements)`; a plain
tensor is narrowed to that box, and a `LazyExperts` value builds only the experts in the rank's dim-0 range
[offset_0, offset_0 + local_0), so no rank ever materialises the whole grown MoE.

    plan = resolve_growth(cfg, target_args)            # before the model is built: plan.dst_args is the shape
    model = build_model(plan.dst_args if plan else target_args, "meta") ...
    load_model_weights(model, state_dict)              # full or LazyExperts values -> local shards
"""

from __future__ import annotations


import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from titan_aquila.errors import UserError
from titan_aquila.growth.lazy import LazyExperts, materialize


def _is_strided(placement) -> bool:
    return type(placement).__name__ == "_StridedShard"


def local_part(value, like: DTensor) -> torch.Tensor:
    """The slice of the full `value` (Tensor or LazyExperts) that this rank holds of the DTensor `like`."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = like.device_mesh, like.placements
    if any(_is_strided(p) for p in placements):
        # Interleaved shards (FSDP over TP on one dim) are not one box; let DTensor split the full tensor.
        return distribute_tensor(materialize(value).to(like.dtype), mesh, placements).to_local()
    shape, offset = compute_local_shape_and_global_offset(like.shape, mesh, placements)
    if isinstance(value, LazyExperts):
        x, first = value.build(offset[0], offset[0] + shape[0]), 1
    else:
        x, first = value, 0
    for d in range(first, len(shape)):
        if shape[d] != x.shape[d]:
            x = x.narrow(d, offset[d], shape[d])
    return x.contiguous()


def load_model_weights(model: torch.nn.Module, sd: dict) -> None:
    """Copy `sd` (name -> full Tensor or LazyExperts, names as in DEVELOPING.md) into `model`, whose parameters
    may be DTensors. Every persistent model tensor must be given, with its full shape; UserError otherwise."""
    template = get_model_state_dict(model)
    missing = sorted(set(template) - set(sd))
    extra = sorted(set(sd) - set(template))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                ([f"unexpected {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")] if extra else [])
        raise UserError(f"state dict does not match the model: {'; '.join(parts)}")
    new = {}
    for name, like in template.items():
        value = sd[name]
        shape = tuple(value.shape)
        if shape != tuple(like.shape):
            raise UserError(f"state dict tensor {name} has shape {list(shape)}, the model expects {list(like.shape)}")
        if isinstance(like, DTensor):
            local = local_part(value, like).to(device=like.device, dtype=like.dtype)
            new[name] = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                           shape=like.shape, stride=like.stride())
        else:
            new[name] = materialize(value).to(device=like.device, dtype=like.dtype)
    set_model_state_dict(model, new, options=StateDictOptions(strict=True))
