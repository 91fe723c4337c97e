"""The parallelization plan, top to bottom: float8 -> TP -> EP -> activation checkpointing -> compile -> FSDP2.

Each `apply_*` changes the model in place and logs what it did (rank 0); the model code knows nothing of this.
float8 comes first because it swaps Linear modules (a swap after TP would drop the TP hooks). FSDP2 comes last so
it shards whatever the other steps produced (DTensors of TP/EP become 2-D shardings).
Parameter names stay those of the model: compile/AC wrappers add `_orig_mod` / `_checkpoint_wrapped_module`
to `module.state_dict()` keys, which DCP's `get_model_state_dict` (used by the checkpoint code) removes.
"""

from __future__ import annotations

import torch
from torch import nn

from titan_aquila.errors import UserError
from titan_aquila.metrics import rank0_print
from titan_aquila.parallel.parallel_dims import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def parallelize_model(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    """Apply every configured feature; a single process gets float8/AC/compile only."""
    validate_parallelize(model.args, dims, cfg)
    if cfg.float8.enable:
        from titan_aquila.quantization.float8 import apply_float8

        apply_float8(model, cfg)
    if dims.tp_enabled:
        from titan_aquila.parallel.tensor_parallel import apply_tp

        apply_tp(model, dims.world_mesh["tp"], cfg)
    if dims.ep_enabled:
        from titan_aquila.parallel.expert_parallel import apply_ep

        apply_ep(model, dims)
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model, cfg, dims)
    if dims.fsdp_enabled:
        apply_fsdp(model, dims, cfg)
    return model


def validate_parallelize(args, dims: ParallelDims, cfg) -> None:
    """Every user error of the plan, raised before anything is changed (so it is cheap to test)."""
    if cfg.compile.enable and cfg.compile.backend not in COMPILE_BACKENDS:
        raise UserError(f"compile.backend {cfg.compile.backend!r} is not supported; use one of "
                        f"{', '.join(COMPILE_BACKENDS)}")
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and not (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1):
        raise UserError(f"activation_checkpoint.selective_ac_option must be a positive integer n (every n-th "
                        f"block) here, got {ac.selective_ac_option!r}")
    if dims.tp_enabled:
        from titan_aquila.parallel.tensor_parallel import validate_tp

        validate_tp(args, dims.tp, cfg.training.seq_len, cfg.parallelism.enable_sequence_parallel)
        if cfg.float8.enable:
            raise UserError("float8.enable with tensor parallelism is not supported; use FSDP/EP with float8")
    if dims.ep_enabled:
        from titan_aquila.parallel.expert_parallel import validate_ep

        validate_ep(args, dims.ep)
    if cfg.float8.enable:
        from titan_aquila.quantization.float8 import validate_float8

        validate_float8(cfg.float8)


def apply_ac(model: nn.Module, ac) -> None:
    """'full': every block recomputes its forward in backward. 'selective' n: every n-th block (0, n, 2n, ...).
    (Op-level selective AC, 'op', is not implemented: block-level is what pays on CPU.)"""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = 1 if ac.mode == "full" else int(ac.selective_ac_option)
    wrapped = []
    for i, (name, block) in enumerate(list(model.layers.items())):
        if i % every == 0:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: no RNG to keep
            wrapped.append(name)
    rank0_print(f"[parallelize] activation checkpointing ({ac.mode}) on blocks {', '.join(wrapped)}")


def _bf16_compute(cfg, dims: ParallelDims) -> bool:
    return dims.fsdp_enabled and cfg.training.mixed_precision_param == "bfloat16"


def apply_compile(model: nn.Module, cfg, dims: ParallelDims) -> None:
    """torch.compile each transformer block (identical blocks reuse one compiled graph).

    Under TP, attention and feed-forward are compiled separately (cpu-facts trap 3: a whole compiled block fails in
    backward with DTensor activations). Dense blocks compile with fullgraph=True; MoE blocks allow graph breaks
    (dropless expert groups have data-dependent sizes). `torch._grouped_mm` compiles only in bf16 (trap 4), so unless
    FSDP computes in bf16 the experts stay eager (they are already a single grouped GEMM per weight), except with
    moe.pad_to_capacity, whose fixed [E, C, D] groups are batched GEMMs that compile in any dtype; EP experts are
    always eager (all-to-all with data-dependent splits)."""
    comp = cfg.compile
    bf16 = _bf16_compute(cfg, dims)
    eager_experts = 0
    for name, block in list(model.layers.items()):
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        moe = getattr(inner, "moe", None)
        if moe is not None and not bf16 and not moe.pad_to_capacity and \
                not getattr(moe.experts.forward, "_torchdynamo_disable", False):
            moe.experts.forward = torch.compiler.disable(moe.experts.forward)
            eager_experts += 1
        if dims.tp_enabled:
            inner.attention = torch.compile(inner.attention, backend=comp.backend, fullgraph=True)
            if moe is None:
                inner.feed_forward = torch.compile(inner.feed_forward, backend=comp.backend, fullgraph=True)
        else:
            model.layers[name] = torch.compile(block, backend=comp.backend, fullgraph=moe is None)
    rank0_print(f"[parallelize] torch.compile ({comp.backend}) per {'attention/feed-forward' if dims.tp_enabled else 'block'}"
                f"{f'; experts of {eager_experts} MoE layers stay eager (fp32 grouped_mm)' if eager_experts else ''}")


def apply_fsdp(model: nn.Module, dims: ParallelDims, cfg) -> None:
    """fully_shard each block, then the root (embeddings, final norm, output; a tied output is the root's table).

    HSDP when dp_replicate > 1. reshard_after_forward: 'always' / 'never', or 'default' = reshard every block but
    the last (its parameters are needed again at once by backward) and keep the root unsharded (torchtitan's
    choice). Under EP the experts are their own FSDP unit over "dp_shard_mod_ep" (see parallel_dims), or are left
    out of FSDP when that dimension is 1 (they are already split over all the ranks that could shard them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    from titan_aquila.parallel.expert_parallel import expert_modules

    t = cfg.training
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[t.mixed_precision_param], reduce_dtype=DTYPES[t.mixed_precision_reduce])
    mesh = dims.fsdp_mesh
    policy = cfg.parallelism.fsdp_reshard_after_forward
    ignored: set = set()
    for experts in expert_modules(model):
        if dims.expert_fsdp_mesh is None:
            ignored.update(experts.parameters())
            continue
        local_experts = model.args.n_experts // dims.ep
        # Fewer local experts than FSDP ranks: shard the hidden dim instead, so no rank holds an empty shard.
        dim = 0 if local_experts >= dims.dp_shard_mod_ep else 1
        fully_shard(experts, mesh=dims.expert_fsdp_mesh, mp_policy=mp, reshard_after_forward=policy != "never",
                    shard_placement_fn=lambda p, d=dim: Shard(d))
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        reshard = policy == "always" or (policy == "default" and i < len(blocks) - 1)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy == "always", ignored_params=ignored or None)
    kind = "HSDP" if dims.hsdp_enabled else "FSDP2"
    rank0_print(f"[parallelize] {kind} over {mesh.size()} ranks: {len(blocks)} blocks + root; param "
                f"{t.mixed_precision_param}, reduce {t.mixed_precision_reduce}, reshard_after_forward {policy}"
                f"{f'; {len(ignored)} EP expert weights not FSDP-sharded' if ignored else ''}")
