"""Write weights into a possibly sharded model one tensor at a time, each rank building only its local shards.

For a parameter that is a DTensor (FSDP2 / TP / EP), each rank builds only its local shard: the shard's global
offset and shape come from `compute_local_shape_and_global_offset(global_shape, mesh, placements)`; a plain
tensor is narrowed to that box, and a lazy value (`LazyExperts`, `LazyInit`: anything with `build(start, stop)`
over dim 0) builds only the rows [offset_0, offset_0 + local_0), so no rank ever materialises a whole grown MoE.
Values are copied in place into the existing local tensors, one at a time: the peak is the model's local shards
plus one tensor, never a second copy of the model.

    model = build_model(args, "meta"); model = parallelize_model(model, dims, cfg)   # torchtitan's order
    init_model_weights(model, args, seed, device)     # to_empty, then each rank draws only its local shards
    load_model_weights(model, state_dict)             # full or lazy values -> local shards
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from titan_aquila.errors import UserError
from titan_aquila.models.args import ModelArgs

WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")
"""What compile / activation checkpointing add to parameter names (the same names DCP's state-dict helpers drop)."""


def _is_strided(placement) -> bool:
    return type(placement).__name__ == "_StridedShard"


def _is_lazy(value) -> bool:
    return hasattr(value, "build") and not isinstance(value, torch.Tensor)


def full_value(value) -> torch.Tensor:
    """A plain tensor from a Tensor or a lazy value (all rows)."""
    return value.build() if _is_lazy(value) else value


def local_part(value, like: DTensor) -> torch.Tensor:
    """The slice of the full `value` (Tensor or lazy value) that this rank holds of the DTensor `like`."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = like.device_mesh, like.placements
    if any(_is_strided(p) for p in placements):
        # Interleaved shards (FSDP over TP on one dim) are not one box; let DTensor split the full tensor.
        return distribute_tensor(full_value(value).to(like.dtype), mesh, placements).to_local()
    shape, offset = compute_local_shape_and_global_offset(like.shape, mesh, placements)
    if _is_lazy(value):
        x, first = value.build(offset[0], offset[0] + shape[0]), 1
    else:
        x, first = value, 0
    for d in range(first, len(shape)):
        if shape[d] != x.shape[d]:
            x = x.narrow(d, offset[d], shape[d])
    return x.contiguous()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent tensors (parameters, possibly DTensors, and persistent buffers) by canonical name."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        out[name] = t
    return out


@torch.no_grad()
def write_tensor(name: str, target: torch.Tensor, value) -> None:
    """Copy the full-shaped `value` (Tensor or lazy) into `target`'s local part, in place."""
    shape = tuple(value.shape)
    if shape != tuple(target.shape):
        raise UserError(f"state dict tensor {name} has shape {list(shape)}, the model expects {list(target.shape)}")
    if isinstance(target, DTensor):
        local = local_part(value, target).to(device=target.device, dtype=target.dtype)
        target.copy_(DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                        shape=target.shape, stride=target.stride()))
    else:
        target.copy_(full_value(value))


def check_names(template, names) -> None:
    missing = sorted(set(template) - set(names))
    extra = sorted(set(names) - set(template))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                ([f"unexpected {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")] if extra else [])
        raise UserError(f"state dict does not match the model: {'; '.join(parts)}")


def load_model_weights(model: torch.nn.Module, sd: dict) -> None:
    """Copy `sd` (name -> full Tensor or lazy value, names as in DEVELOPING.md) into `model`, whose parameters
    may be DTensors. Every persistent model tensor must be given, with its full shape; UserError otherwise."""
    template = model_tensors(model)
    check_names(template, sd)
    for name, target in template.items():
        write_tensor(name, target, sd[name])


def root_transformer(model: torch.nn.Module):
    from titan_aquila.models.aquila import Transformer

    return next(m for m in model.modules() if isinstance(m, Transformer))


def init_model_weights(model: torch.nn.Module, args: ModelArgs, seed: int, device: torch.device | str) -> None:
    """torchtitan's last step after a meta build and parallelize: allocate this rank's shards (`to_empty`), then
    draw each tensor's local part from its (seed, name) generators (models/init.py): the same values a single
    process gets from `build_model(args, seed=seed)`, whatever the layout."""
    from titan_aquila.models.init import initial_value

    model.to_empty(device=device)
    for name, target in model_tensors(model).items():
        write_tensor(name, target, initial_value(name, target, args, seed))
    with torch.no_grad():
        root_transformer(model).init_buffers()
