"""Every rule a job's settings must satisfy, in one place, checked before torch is imported or anything is built.

    option_errors(cfg)           each option on its own (type, allowed values, range); `JobConfig.validate` raises
                                 them together, so `load_job_config` never returns an invalid config
    validate_job(cfg, args, dims) rules that span sections: the config against the model's shape (`ModelArgs`) and
                                 the parallel degrees (`ParallelDims`, already checked against the world size)

The code that applies a setting (`parallel/`, `quantization/`, `growth/loader.py`, the checkpoint manager) trusts
these checks and does not repeat them.
"""

from __future__ import annotations

import importlib.util
import math

from titan_aquila.config import parse as cp
from titan_aquila.data.sources import mixture_errors
from titan_aquila.errors import UserError, did_you_mean
from titan_aquila.models.args import ModelArgs, build_model_args

MOE_RUNTIME_OPTIONS = ("z_loss_type", "capacity_factor", "pad_to_capacity")
"""[moe] options the model code reads: `job_model_args` copies them into ModelArgs (they change no weight)."""


def option_errors(cfg) -> list[str]:
    """One message per violated rule; type errors first (the range checks assume the types are right)."""
    errors: list[str] = []
    for opt in cp.all_options(type(cfg)).values():
        value = getattr(getattr(cfg, opt.section), opt.name)
        try:
            cp.from_value(opt, value, "")
        except UserError as e:
            errors.append(str(e))
            continue
        if (msg := cp.check_choice(opt, value)) is not None:
            errors.append(msg)
    if errors:
        return errors

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            section, _, name = key.partition(".")
            errors.append(f"{key} must be {rule}, got {getattr(getattr(cfg, section), name)!r}")

    t, o, s, v, p = cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.validation, cfg.parallelism
    ck, ac, g, f8 = cfg.checkpoint, cfg.activation_checkpoint, cfg.growth, cfg.float8
    need(bool(cfg.job.dump_folder), "job.dump_folder", "a non-empty path")
    need(bool(cfg.model.name), "model.name", "non-empty")
    need(bool(cfg.model.flavor), "model.flavor", "non-empty")
    need(t.local_batch_size >= 1, "training.local_batch_size", ">= 1")
    need(t.global_batch_size == -1 or t.global_batch_size >= 1, "training.global_batch_size", "-1 or >= 1")
    if t.global_batch_size >= 1 and t.local_batch_size >= 1:
        need(t.global_batch_size % t.local_batch_size == 0, "training.global_batch_size",
             f"a multiple of training.local_batch_size ({t.local_batch_size})")
    need(t.seq_len >= 1, "training.seq_len", ">= 1")
    need(t.loss_chunk_size >= 1, "training.loss_chunk_size", ">= 1")
    need(t.max_norm > 0, "training.max_norm", "> 0 (inf disables clipping)")
    need(t.steps >= 0, "training.steps", ">= 0")
    need(t.seed >= 0, "training.seed", ">= 0")
    need(t.num_workers >= 0, "training.num_workers", ">= 0")
    errors += mixture_errors(t.datasets, t.dataset_path)
    need(o.lr >= 0 and math.isfinite(o.lr), "optimizer.lr", "finite and >= 0")
    need(o.eps > 0, "optimizer.eps", "> 0")
    need(0 <= o.beta1 < 1, "optimizer.beta1", "in [0, 1)")
    need(0 <= o.beta2 < 1, "optimizer.beta2", "in [0, 1)")
    need(o.weight_decay >= 0, "optimizer.weight_decay", ">= 0")
    need(s.warmup_steps >= 0, "lr_scheduler.warmup_steps", ">= 0")
    need(s.decay_ratio is None or 0 < s.decay_ratio <= 1, "lr_scheduler.decay_ratio", "none or in (0, 1]")
    need(0 <= s.min_lr_factor <= 1, "lr_scheduler.min_lr_factor", "in [0, 1]")
    need(v.freq >= 1, "validation.freq", ">= 1")
    need(v.steps == -1 or v.steps >= 1, "validation.steps", "-1 or >= 1")
    need(v.local_batch_size == -1 or v.local_batch_size >= 1, "validation.local_batch_size", "-1 or >= 1")
    for name in ("data_parallel_replicate_degree", "tensor_parallel_degree", "expert_parallel_degree"):
        need(getattr(p, name) >= 1, f"parallelism.{name}", ">= 1")
    need(p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
         "parallelism.data_parallel_shard_degree", "-1 or >= 1")
    need(bool(ck.folder), "checkpoint.folder", "a non-empty path")
    need(ck.interval >= 1, "checkpoint.interval", ">= 1")
    need(ck.keep_latest_k >= 0, "checkpoint.keep_latest_k", ">= 0")
    need(cfg.metrics.log_freq >= 1, "metrics.log_freq", ">= 1")
    need(bool(cfg.metrics.save_tb_folder), "metrics.save_tb_folder", "a non-empty path")
    for comp in cfg.compile.components:
        if comp not in ("model", "loss"):
            errors.append(f"invalid value {comp!r} in 'compile.components': expected 'model' or 'loss'"
                          + did_you_mean(comp, ["model", "loss"]))
    need(ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1,
         "activation_checkpoint.selective_ac_option", "a positive integer such as '2' (op-level 'op' is not "
         "implemented)")
    need(not f8.enable_fsdp_float8_all_gather or f8.recipe_name == "tensorwise",
         "float8.enable_fsdp_float8_all_gather", "false unless float8.recipe_name is 'tensorwise'")
    for name in ("load_balance_coeff", "z_loss_coeff", "bias_update_rate"):
        need(getattr(cfg.moe, name) >= 0, f"moe.{name}", ">= 0")
    cf = cfg.moe.capacity_factor
    need(cf is None or (math.isfinite(cf) and cf >= 0), "moe.capacity_factor", "none, 0 (dropless) or > 0")
    need(not cfg.moe.pad_to_capacity or bool(cf), "moe.pad_to_capacity", "false unless moe.capacity_factor > 0")
    need(not g.enable or bool(g.source_path), "growth.source_path", "set when growth.enable is true")
    need(not g.enable or bool(g.methods), "growth.methods", "non-empty when growth.enable is true")
    need(g.noise_std >= 0, "growth.noise_std", ">= 0")
    need(0 <= g.split_spread < 1, "growth.split_spread", "in [0, 1)")
    need(g.seed >= 0, "growth.seed", ">= 0")
    need(g.router_init_std >= 0, "growth.router_init_std", ">= 0")
    need(0 <= g.drop_ratio <= 1, "growth.drop_ratio", "in [0, 1]")
    need(g.granularity >= 1, "growth.granularity", ">= 1")
    need(g.audit_steps >= 1 or g.audit_steps == -1, "growth.audit_steps", ">= 1, or -1 (all)")
    return errors


def job_model_args(cfg) -> ModelArgs:
    """The model a job builds: [model] flavor + overrides, with the [moe] options the model code reads
    (MOE_RUNTIME_OPTIONS). Those are set in [moe] only, so each has one place."""
    clash = [k for k in MOE_RUNTIME_OPTIONS if k in cfg.model.overrides]
    if clash:
        raise UserError(f"set {', '.join(clash)} in [moe], not in [model.overrides]")
    return build_model_args(cfg.model.flavor,
                            {**cfg.model.overrides, **{k: getattr(cfg.moe, k) for k in MOE_RUNTIME_OPTIONS}})


def validate_job(cfg, args, dims) -> None:
    """The rules between sections, for the model `args` the job builds and its parallel degrees `dims`.
    Raises the first violated one as a `UserError`."""
    t, p = cfg.training, cfg.parallelism
    if t.seq_len > args.max_seq_len:
        raise UserError(f"training.seq_len {t.seq_len} is larger than the model's context max_seq_len "
                        f"{args.max_seq_len}")
    if t.global_batch_size != -1 and t.global_batch_size % (t.local_batch_size * dims.dp_degree):
        raise UserError(f"training.global_batch_size {t.global_batch_size} is not a multiple of local_batch_size "
                        f"{t.local_batch_size} x data-parallel degree {dims.dp_degree}")
    if cfg.checkpoint.initial_load_path and cfg.growth.enable:
        raise UserError("set either checkpoint.initial_load_path or growth.enable (growth.source_path), not both")
    if dims.tp_enabled:
        for name in ("n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(args, name) % dims.tp:
                raise UserError(f"tensor_parallel_degree {dims.tp} does not divide model.{name} "
                                f"({getattr(args, name)})")
        if p.enable_sequence_parallel and t.seq_len % dims.tp:
            raise UserError(f"tensor_parallel_degree {dims.tp} does not divide training.seq_len ({t.seq_len}) "
                            f"(sequence parallelism splits the sequence)")
        if cfg.float8.enable:
            raise UserError("float8.enable with tensor parallelism is not supported; use FSDP/EP with float8")
    if dims.ep_enabled:
        if args.n_experts == 0:
            raise UserError("expert_parallel_degree > 1 needs an MoE model (model.n_experts > 0)")
        if args.n_experts % dims.ep:
            raise UserError(f"expert_parallel_degree {dims.ep} does not divide model.n_experts ({args.n_experts})")
    if cfg.float8.enable and importlib.util.find_spec("torchao") is None:
        raise UserError("float8.enable needs torchao; install it with pip install 'titan_aquila[float8]' or "
                        "pip install torchao")
