"""The parallelization plan, top to bottom: TP -> EP -> activation checkpointing -> compile per block -> FSDP2.

Each `apply_*` changes the model in place and logs what it did (rank 0). The model code knows nothing of this.
"""

from __future__ import annotations

import torch
from torch import nn

from titan_aquila.errors import UserError
from titan_aquila.metrics import rank0_print
from titan_aquila.parallel.parallel_dims import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parallelize_model(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    if dims.tp_enabled:
        from titan_aquila.parallel.tensor_parallel import apply_tp

        apply_tp(model, dims.world_mesh["tp"], cfg)
    if dims.ep_enabled:
        from titan_aquila.parallel.expert_parallel import apply_ep

        apply_ep(model, dims)
    if cfg.float8.enable:
        from titan_aquila.parallel.float8 import apply_float8

        apply_float8(model, cfg)
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, cfg.compile, tp=dims.tp_enabled)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, cfg)
    return model


def apply_ac(model: nn.Module, ac) -> None:
    """'full': every block recomputes its forward in backward. 'selective' with an integer n: every n-th block.
    ('op'-level selective AC would need per-op save lists; we keep the block-level form, which is what pays on CPU.)"""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if ac.mode == "selective" and not ac.selective_ac_option.isdigit():
        raise UserError(f"activation_checkpoint.selective_ac_option must be an integer n (every n-th block) here, "
                        f"got {ac.selective_ac_option!r}")
    every = 1 if ac.mode == "full" else int(ac.selective_ac_option)
    wrapped = []
    for i, (name, block) in enumerate(list(model.layers.items())):
        if i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)
            wrapped.append(name)
    rank0_print(f"[parallelize] activation checkpointing ({ac.mode}) on blocks {', '.join(wrapped)}")


def apply_compile(model: nn.Module, comp, tp: bool) -> None:
    """torch.compile each transformer block (one graph per block; the blocks share code so they reuse it).
    Under TP, attention and feed-forward are compiled separately (cpu-facts trap 3: a whole compiled block fails in
    backward with DTensor inputs)."""
    if comp.backend not in ("inductor", "aot_eager", "eager"):
        raise UserError(f"compile.backend {comp.backend!r} is not supported; use inductor, aot_eager or eager")
    for name, block in list(model.layers.items()):
        if tp:
            inner = getattr(block, "_checkpoint_wrapped_module", block)
            inner.attention = torch.compile(inner.attention, backend=comp.backend)
            if hasattr(inner, "feed_forward"):
                inner.feed_forward = torch.compile(inner.feed_forward, backend=comp.backend)
        else:
            model.layers[name] = torch.compile(block, backend=comp.backend, fullgraph=not _has_moe(block))
    rank0_print(f"[parallelize] torch.compile ({comp.backend}) per {'submodule' if tp else 'block'}")


def _has_moe(block: nn.Module) -> bool:
    # MoE dispatch has data-dependent shapes (bincount/tolist); allow graph breaks there.
    return any(n.endswith("moe") for n, _ in block.named_modules())


def apply_fsdp(model: nn.Module, dims: ParallelDims, cfg) -> None:
    """fully_shard each block, then the root (embeddings, final norm, output; a tied output shares the root unit).
    HSDP when dp_replicate > 1: shard within dp_shard, replicate across dp_replicate."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    t = cfg.training
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[t.mixed_precision_param], reduce_dtype=DTYPES[t.mixed_precision_reduce])
    mesh = dims.world_mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else dims.world_mesh["dp_shard"]
    policy = cfg.parallelism.fsdp_reshard_after_forward
    reshard = {"always": True, "never": False, "default": True}[policy]
    from titan_aquila.parallel.expert_parallel import expert_parallel_params

    ignored = expert_parallel_params(model) or None  # EP-sharded experts are not FSDP-sharded again
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away in backward: keep them (torchtitan's default).
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored,
                    reshard_after_forward=reshard if (policy != "default" or i < len(blocks) - 1) else False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always", ignored_params=ignored)
    kind = "HSDP" if dims.dp_replicate > 1 else "FSDP2"
    rank0_print(f"[parallelize] {kind} over {mesh.size()} ranks: {len(blocks)} blocks + root; "
                f"param {t.mixed_precision_param}, reduce {t.mixed_precision_reduce}, reshard_after_forward {policy}")
