"""The parallelization plan, top to bottom: float8 -> TP -> EP -> activation checkpointing -> compile -> FSDP2.

Each `apply_*` changes the model in place and logs what it did (rank 0); the model code knows nothing of this.
The plan was checked before anything was built (`titan_aquila/config/validate.py`), so these functions trust their
inputs. float8 comes first because it swaps Linear modules (a swap after TP would drop the TP hooks). FSDP2 comes
last so it shards whatever the other steps produced (DTensors of TP/EP become 2-D shardings).
Parameter names stay those of the model: compile/AC wrappers add `_orig_mod` / `_checkpoint_wrapped_module`
to `module.state_dict()` keys, which DCP's `get_model_state_dict` (used by the checkpoint code) removes.
"""

from __future__ import annotations

import torch
from torch import nn

from titan_aquila.logging import logger
from titan_aquila.parallel.parallel_dims import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parallelize_model(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    """Apply every configured feature; a single process gets float8/AC/compile only."""
    if cfg.float8.enable:
        from titan_aquila.quantization.float8 import apply_float8

        apply_float8(model, cfg.float8)
    if dims.tp_enabled:
        from titan_aquila.parallel.tensor_parallel import apply_tp

        apply_tp(model, dims.world_mesh["tp"], cfg.parallelism.enable_sequence_parallel)
    if dims.ep_enabled:
        from titan_aquila.parallel.expert_parallel import apply_ep

        apply_ep(model, dims.ep_mesh["ep"])
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint)
    t = cfg.training
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, cfg.compile, per_submodule=dims.tp_enabled,
                      bf16_compute=dims.fsdp_enabled and t.mixed_precision_param == "bfloat16")
    if dims.fsdp_enabled:
        apply_fsdp(model, dims.fsdp_mesh, DTYPES[t.mixed_precision_param], DTYPES[t.mixed_precision_reduce],
                   cfg.parallelism.fsdp_reshard_after_forward, expert_mesh=dims.expert_fsdp_mesh)
    return model


def apply_ac(model: nn.Module, ac) -> None:
    """'full': every block recomputes its forward in backward. 'selective' n: every n-th block (0, n, 2n, ...)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = 1 if ac.mode == "full" else int(ac.selective_ac_option)
    wrapped = []
    for i, (name, block) in enumerate(list(model.layers.items())):
        if i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to keep
            wrapped.append(name)
    logger.info(f"[parallelize] activation checkpointing ({ac.mode}) on blocks {', '.join(wrapped)}")


def apply_compile(model: nn.Module, compile_cfg, per_submodule: bool = False, bf16_compute: bool = False) -> None:
    """torch.compile each transformer block (identical blocks reuse one compiled graph).

    `per_submodule` (under TP): attention and feed-forward are compiled separately, because a whole compiled block
    fails in backward with DTensor activations (torch 2.13). Dense blocks compile with fullgraph=True; MoE blocks
    allow graph breaks (dropless expert groups have data-dependent sizes). Inductor lowers `torch._grouped_mm` only
    for bf16 inputs (fp32 raises "Expected inputs of BF16 type"), so unless the compute is bf16 (`bf16_compute`:
    FSDP2 casts parameters to bf16) the experts stay eager (they are already one grouped GEMM per weight), except
    with moe.pad_to_capacity, whose fixed [E, C, D] groups are batched GEMMs that compile in any dtype; EP experts
    are always eager (all-to-all with data-dependent splits)."""
    backend = compile_cfg.backend
    eager_experts = 0
    for name, block in list(model.layers.items()):
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        moe = inner.moe if inner.moe_enabled else None
        if moe is not None and not bf16_compute and not moe.pad_to_capacity and \
                not getattr(moe.experts.forward, "_torchdynamo_disable", False):
            moe.experts.forward = torch.compiler.disable(moe.experts.forward)
            eager_experts += 1
        if per_submodule:
            inner.attention = torch.compile(inner.attention, backend=backend, fullgraph=True)
            if moe is None:
                inner.feed_forward = torch.compile(inner.feed_forward, backend=backend, fullgraph=True)
        else:
            model.layers[name] = torch.compile(block, backend=backend, fullgraph=moe is None)
    eager = f"; experts of {eager_experts} MoE layers stay eager (grouped_mm; inductor lowers it for bf16 " \
        "parameters only)" if eager_experts else ""
    logger.info(f"[parallelize] torch.compile ({backend}) per {'attention/feed-forward' if per_submodule else 'block'}"
                f"{eager}")


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str = "default", expert_mesh=None) -> None:
    """fully_shard each block, then the root (embeddings, final norm, output; a tied output is the root's table).

    `dp_mesh` is 1-D (FSDP) or 2-D (replicate, shard) for HSDP. reshard_after_forward: 'always' / 'never', or
    'default' = reshard every block but the last (its parameters are needed again at once by backward) and keep the
    root unsharded (torchtitan's choice). Under EP the experts are their own FSDP unit over `expert_mesh`
    ("dp_shard_mod_ep", see parallel_dims), or are left out of FSDP when it is None (they are already split over all
    the ranks that could shard them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from titan_aquila.parallel.expert_parallel import expert_modules

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    policy = reshard_after_forward
    ignored: set = set()
    for experts in expert_modules(model):
        if expert_mesh is None:
            ignored.update(experts.parameters())
            continue
        w1 = experts.w1
        local_experts = (w1.to_local() if isinstance(w1, DTensor) else w1).shape[0]
        # Fewer local experts than FSDP ranks: shard the hidden dim instead, so no rank holds an empty shard.
        dim = 0 if local_experts >= expert_mesh.size(expert_mesh.ndim - 1) else 1
        fully_shard(experts, mesh=expert_mesh, mp_policy=mp, reshard_after_forward=policy != "never",
                    shard_placement_fn=lambda p, d=dim: Shard(d))
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        reshard = policy == "always" or (policy == "default" and i < len(blocks) - 1)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard, ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=policy == "always",
                ignored_params=ignored or None)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    logger.info(f"[parallelize] {'HSDP' if dp_mesh.ndim == 2 else 'FSDP2'} over {dp_mesh.size()} ranks: {len(blocks)} "
                f"blocks + root; param {dtype_name[param_dtype]}, reduce {dtype_name[reduce_dtype]}, "
                f"reshard_after_forward {policy}"
                f"{f'; {len(ignored)} EP expert weights not FSDP-sharded' if ignored else ''}")
