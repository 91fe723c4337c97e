"""Train (or keep training, or grow then train) an Aquila dense/MoE model.

    python train.py --job.config_file train_configs/debug_model.toml
    torchrun --standalone --nproc_per_node=2 train.py --job.config_file train_configs/debug_model.toml
    python train.py --help

Top to bottom: config -> plan (model args, parallel degrees, accumulation; every rule checked before torch is
imported) -> distributed -> growth plan -> model -> parallelize -> optimizer/schedule -> data -> checkpoint (resume |
initial load | grow) -> [growth audit] -> steps -> final save -> gloo-safe exit.

One step (`train_step`), with A = global_batch_size / (local_batch_size x dp degree) micro-batches:

    grad = d/dθ  (1/A) Σ_micro  [ CE + Σ_{MoE layers l} (load_balance_coeff·lb_l + z_loss_coeff·z_l) ]
           (FSDP2 averages over dp ranks; moe.aux_loss_reduction = "mean" averages over the layers instead)
    clip to training.max_norm; a non-finite loss or grad norm stops the run or skips the update (training.on_nonfinite)
    AdamW step; LR schedule step; expert loads all-reduced and reset; expert_bias += rate·sign(mean load − load)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from titan_aquila import interrupts
from titan_aquila.config import load_job_config
from titan_aquila.config.validate import job_model_args, validate_job
from titan_aquila.errors import UserError
from titan_aquila.logging import logger
from titan_aquila.models.args import ModelArgs
from titan_aquila.parallel.dist_utils import set_per_rank_inductor_cache, world_info
from titan_aquila.parallel.parallel_dims import ParallelDims


def plan_job(cfg) -> tuple[ModelArgs, ParallelDims, int]:
    """What can be checked without torch: model args (flavor + overrides), parallel degrees against the world
    size, every rule between them (config/validate.py), and the number of micro-batches per step."""
    args = job_model_args(cfg)  # [model] flavor + overrides, with the [moe] options the model code reads
    dims = ParallelDims.from_config(cfg.parallelism, world_info()[2])
    validate_job(cfg, args, dims)
    t = cfg.training
    accum = 1 if t.global_batch_size == -1 else t.global_batch_size // (t.local_batch_size * dims.dp_degree)
    return args, dims, accum


@dataclass
class StepParts:
    """What one optimizer step needs besides the batches."""

    model: object
    optimizer: object
    scheduler: object
    loss_fn: object  # training_loss, possibly compiled
    fused_chunk: int  # > 0: the fused chunked output + cross-entropy (titan_aquila/losses.py); 0: loss_fn on logits
    coeffs: tuple[float, float, bool]  # load_balance_coeff, z_loss_coeff, z on the output logits
    autocast: object  # () -> context manager
    device: object
    dp_group: object
    accum: int
    max_norm: float
    on_nonfinite: str
    bias_update_rate: float
    fused_head: object  # its class: losses.FusedOutputLoss, or parallel/loss_parallel.py's under TP


def train_step(p: StepParts, data_iter, step: int):
    """One optimizer step over `p.accum` micro-batches. Returns (parts [ce, lb, z] averaged over the global batch,
    grad norm, the LR this step used, expert load {layer: tokens per expert} summed over dp ranks)."""
    import warnings

    import torch

    from titan_aquila.train_utils import (collect_expert_load, combine_loss, full_grad_norm, reduce_mean,
                                          update_expert_bias)

    p.optimizer.zero_grad(set_to_none=True)
    parts = torch.zeros(3, device=p.device)  # [ce, load balance, z], means over this rank's micro-batches
    for _ in range(p.accum):
        inputs, labels = (x.to(p.device) for x in next(data_iter))
        if p.fused_chunk:  # CE and output z come out of the model's forward; no [tokens, vocab] logits
            with p.autocast():
                (ce, z_out), aux = p.model(inputs, head=p.fused_head(labels, p.fused_chunk, p.coeffs[2]))
            loss, detached = combine_loss(ce, z_out, aux, *p.coeffs[:2])
        else:
            with p.autocast():
                logits, aux = p.model(inputs)
            loss, detached = p.loss_fn(logits, labels, aux, *p.coeffs)
        (loss / p.accum).backward()  # + FSDP2's mean over dp ranks = the gradient of the global-batch mean
        parts += detached / p.accum
    grad_norm = full_grad_norm(p.model, p.max_norm)  # global norm before clipping, over every mesh
    parts = reduce_mean(parts, p.dp_group)
    loss_ok, norm_ok = bool(torch.isfinite(parts).all()), bool(torch.isfinite(grad_norm))
    finite = loss_ok and norm_ok
    if not finite:
        msg = (f"non-finite {'gradient norm' if loss_ok else 'loss'} at step {step} (loss {parts[0].item():.4g}, "
               f"load balance {parts[1].item():.4g}, z {parts[2].item():.4g}, grad norm {grad_norm.item():.4g})")
        if p.on_nonfinite == "stop":
            raise UserError(f"{msg} (training.on_nonfinite = 'stop'; 'skip' drops such steps)")
        logger.warning(f"{msg}; skipping the optimizer step (training.on_nonfinite = 'skip')")
        p.optimizer.zero_grad(set_to_none=True)
    else:
        p.optimizer.step()
    lr = p.scheduler.get_last_lr()[0]  # the rate this step used
    with warnings.catch_warnings():  # LambdaLR warns if a skipped step 1 advances it before any update
        warnings.simplefilter("ignore", UserWarning)
        p.scheduler.step()  # also on a skipped step: the LR stays a function of the step number
    load = collect_expert_load(p.model, p.dp_group)  # all-reduced over dp ranks; counters reset
    if finite and p.bias_update_rate > 0:
        update_expert_bias(p.model, load, p.bias_update_rate)
    return parts, grad_norm, lr, load


def shown_losses(losses, args: ModelArgs) -> dict[str, float]:
    """The step's [ce, load_balance, z] worth showing: CE; the load-balance loss of an MoE; the z-loss when one is
    computed (an MoE's router z-loss, or the output z-loss of z_loss_type 'output_max')."""
    shown = {"ce": losses[0].item()}
    if args.is_moe:
        shown["load_balance"] = losses[1].item()
    if args.is_moe or args.z_loss_type == "output_max":
        shown["z"] = losses[2].item()
    return shown


def train(cfg, args: ModelArgs, dims: ParallelDims, accum: int) -> int:
    # torch and everything built on it is imported only now: `--help` and config mistakes answer in 0.1 s instead
    # of the seconds `import torch` takes on a busy CPU.
    import torch

    from titan_aquila.checkpoint.lineage import carry_forward, check_vocab_fits, resolve_tokenizer, start_checkpoint
    from titan_aquila.checkpoint.manager import CheckpointManager
    from titan_aquila.checkpoint.weights import init_model_weights
    from titan_aquila.data.mixture import MixtureLoader, build_loaders
    from titan_aquila.evaluate import validation_loss
    from titan_aquila.growth.audit import run_growth_audit
    from titan_aquila.growth.loader import plan_stage, resolve_growth
    from titan_aquila.losses import FusedOutputLoss, fused_loss_plan
    from titan_aquila.metrics import MetricsLogger, device_peak_flops, peak_memory_line
    from titan_aquila.models.aquila import build_model
    from titan_aquila.optim import apply_schedule, build_lr_scheduler, build_optimizer
    from titan_aquila.parallel.dist_utils import init_distributed
    from titan_aquila.parallel.parallelize import parallelize_model
    from titan_aquila.train_utils import (aux_coefficients, collect_expert_load, drop_fractions, load_fractions,
                                          reduce_mean, training_loss)

    t, v, m = cfg.training, cfg.validation, cfg.moe
    if cfg.job.print_config:
        logger.info(json.dumps(cfg.to_dict(), indent=2))
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True)
    if t.return_freed_host_memory:  # first: before the growth and the audit leave holes in the heap
        from titan_aquila.host_memory import return_freed_memory_to_os

        logger.info(return_freed_memory_to_os())
    device = init_distributed()
    rank, _, world = world_info()
    dims.build_mesh(device.type)
    dp_rank, dp_degree = dims.dp_rank(), dims.dp_degree
    dp_group = dims.dp_mesh.get_group() if dims.dp_mesh is not None else None
    torch.manual_seed(t.seed)  # the same on every rank

    plan = resolve_growth(cfg, args)  # growth: the source shape comes from its checkpoint; build the grown shape
    if plan is not None:
        args = plan.dst_args  # differs from the config's only in fields validate_job does not depend on
    start_dir = start_checkpoint(cfg)  # its tokenizer is the run's unless model.tokenizer_path names the same one
    tokenizer = resolve_tokenizer(cfg.model.tokenizer_path, start_dir)
    check_vocab_fits(tokenizer, args.vocab_size, "the model")
    do_audit = plan is not None and cfg.growth.audit
    # val_loaders: {"": one set} or, for a mixture, {source: its set}; val_weights average their losses
    train_loader, val_loaders, val_weights = build_loaders(cfg, tokenizer, dp_rank, dp_degree, v.enable or do_audit)
    val_loader = next(iter(val_loaders.values()), None)  # the growth audit's held-out batches

    # torchtitan's order: shapes only on the meta device -> parallelize -> each rank allocates and initialises only
    # its shards. Every tensor is drawn from (seed, name) generators, so 1-rank and N-rank runs start identical.
    model = build_model(args, device="meta")
    logger.info(f"model {cfg.model.flavor}{' + overrides' if cfg.model.overrides else ''}"
                f"{' grown by ' + plan.describe() if plan else ''}: {args.num_params():,} parameters "
                f"({args.num_params(active=True):,} active), {args.flops_per_token(t.seq_len) / 1e6:.1f} MFLOP/token")
    model = parallelize_model(model, dims, cfg)
    init_model_weights(model, args, t.seed, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, t.steps)
    ckpt = CheckpointManager(cfg, model, optimizer, scheduler, train_loader, args, dims, growth_plan=plan)
    start = ckpt.load()  # last checkpoint of this job > checkpoint.initial_load_path > grown source > fresh
    tokens_per_step = t.local_batch_size * dp_degree * accum * t.seq_len
    run_stage = {"kind": "train", "run": os.path.abspath(cfg.job.dump_folder), "seed": t.seed, "start_step": start,
                 "tokens_per_step": tokens_per_step, "dataset": t.dataset_path or  # a mixture: its sources
                 [f"{k}: {d['path']} (weight {d['weight']})" for k, d in sorted(t.datasets.items())]}
    grown = [plan_stage(cfg, plan)] if plan is not None and start_dir is not None and \
        start_dir.parent != ckpt.folder else []  # grown at this start (not resumed)
    ckpt.lineage, ckpt.lineage_files = carry_forward(start_dir, tokenizer, *grown, run_stage)
    apply_schedule(scheduler)  # a resumed run with another training.steps follows its own schedule from here on
    audit = run_growth_audit(plan, cfg.growth.source_path, cfg.growth.audit_steps, model, val_loader, device,
                             dp_group, cfg.job.dump_folder, dims) if do_audit and start == 0 else None

    autocast_dtype = {"": None, "bfloat16": torch.bfloat16}[t.autocast_dtype]
    if autocast_dtype is None and t.mixed_precision_param == "bfloat16" and not dims.fsdp_enabled:
        autocast_dtype = torch.bfloat16  # as torchtitan: without FSDP, mixed_precision_param means autocast
        logger.info("training.mixed_precision_param bfloat16 without FSDP: bf16 autocast, fp32 parameters")
    bf16 = autocast_dtype is not None or (dims.fsdp_enabled and t.mixed_precision_param == "bfloat16")
    peak, peak_desc = device_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    logger.info(f"peak {peak / 1e9:,.1f} GFLOP/s per device ({peak_desc}); gradient accumulation {accum}; global "
                f"batch {t.local_batch_size * dp_degree * accum} x {t.seq_len} = {tokens_per_step:,} tokens; steps "
                f"{start + 1}..{t.steps}")
    metrics = MetricsLogger(cfg.metrics, cfg.job.dump_folder, args.flops_per_token(t.seq_len), peak, world, rank)
    if audit is not None:
        metrics.write(0, {"growth/source_loss": audit.source_loss, "growth/grown_loss": audit.grown_loss,
                          "growth/max_logit_diff": audit.max_logit_diff})
        metrics.log_validation(0, audit.grown_loss, audit.tokens, expert_fracs=audit.expert_load,
                               drop_fracs=audit.dropped_fraction)

    # compile.components 'loss': the CE (+ aux) objective as one graph (fuses the fp32 upcast of the large logits).
    loss_fn = training_loss
    fused, fused_msg = fused_loss_plan(cfg, model, dims.tp_enabled)
    logger.info(fused_msg)
    if cfg.compile.enable and "loss" in cfg.compile.components and not fused:
        loss_fn = torch.compile(training_loss, backend=cfg.compile.backend)
        logger.info(f"[parallelize] torch.compile ({cfg.compile.backend}) of the training loss")
    elif cfg.compile.enable and "loss" in cfg.compile.components:
        logger.info("[parallelize] compile.components 'loss' unused: the fused loss runs eagerly (GEMMs chunk by chunk"
                    f"{'; collectives per chunk under TP' if dims.tp_enabled else ''})")
    fused_head = FusedOutputLoss
    if fused and dims.tp_enabled:
        from titan_aquila.parallel.loss_parallel import VocabParallelOutputLoss

        fused_head = VocabParallelOutputLoss  # vocab-parallel on a Shard(0) output weight, plain fused when tied

    # Validation takes the training loss's path: fused, and under TP vocab-parallel (no gathered logits).
    val_head = (lambda labels: fused_head(labels, t.loss_chunk_size, False)) if fused else None

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def drops(load):  # capacity-factor routing: each MoE layer's dropped share of `load` (and reset the counters)
        return drop_fractions(collect_expert_load(model, dp_group, "tokens_dropped"), load) \
            if args.capacity_factor and args.is_moe else None

    def validate(step: int) -> None:
        t0 = time.perf_counter()
        logger.info(f"validation at step {step} started ({'all' if v.steps < 0 else v.steps} batches)")
        per = {k: validation_loss(model, vl, device, v.steps, autocast(), group=dp_group, head=val_head)
               for k, vl in val_loaders.items()}
        for k, (val, n) in per.items():
            if k:
                metrics.log_source_validation(step, k, val, n)
        val, n = sum(val_weights[k] * r[0] for k, r in per.items()), sum(r[1] for r in per.values())
        # Read (and reset) the validation tokens' expert counts so they never enter a training step's load.
        val_load = collect_expert_load(model, dp_group)
        metrics.log_validation(step, val, n, time.perf_counter() - t0, load_fractions(val_load), drops(val_load))
        run_stage["validation_loss"], run_stage["validation_step"] = val, step

    def log_sources(step: int) -> None:  # a mixture: tokens per source so far, summed over dp ranks
        counts = reduce_mean(torch.tensor(train_loader.source_tokens, dtype=torch.float64), dp_group)
        metrics.log_sources(step, dict(zip(train_loader.names, (counts * dp_degree).tolist())))

    parts = StepParts(model, optimizer, scheduler, loss_fn, t.loss_chunk_size if fused else 0,
                      aux_coefficients(m, args), autocast, device,
                      dp_group, accum, t.max_norm, t.on_nonfinite, m.bias_update_rate, fused_head)
    data_iter = iter(train_loader)  # after ckpt.load(): a fresh iterator starts at the restored position
    try:
        for step in range(start + 1, t.steps + 1):
            metrics.step_started()
            losses, grad_norm, lr, load = train_step(parts, data_iter, step)
            dropped = drops(load)
            metrics.step_finished(tokens_per_step)
            if metrics.should_log(step):
                metrics.log_step(step, shown_losses(losses, args), lr, grad_norm.item(), step * tokens_per_step,
                                 load_fractions(load), device, dropped)
                if isinstance(train_loader, MixtureLoader):
                    log_sources(step)
            if v.enable and (step % v.freq == 0 or step == t.steps):
                validate(step)
            ckpt.maybe_save(step)
        ckpt.maybe_save(t.steps, force=True)
        ckpt.close()
        logger.info(peak_memory_line(device))
    finally:
        metrics.close()
    return 0


def main(argv: list[str]) -> None:
    code, cfg = 0, None
    interrupts.install()  # Ctrl-C / SIGTERM -> Interrupted: an unfinished save is abandoned, a commit completes
    try:
        cfg = load_job_config(argv)  # -h/--help prints the options and raises SystemExit(0)
        args, dims, accum = plan_job(cfg)
        set_per_rank_inductor_cache()  # before torch is imported: TP kernels compiled for one rank are wrong on another
        code = train(cfg, args, dims, accum)
    except UserError as e:
        logger.error(str(e))  # every rank hits the same mistake: the logger prints it once, on rank 0
        code = 2
        from titan_aquila.parallel.dist_utils import let_rank0_report

        let_rank0_report()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt as e:  # one line naming the last complete checkpoint; exit 130 (SIGINT) / 143 (SIGTERM)
        code = interrupts.exit_code(e)
        ck = cfg.checkpoint if cfg is not None else None
        folder = os.path.join(cfg.job.dump_folder, ck.folder) if ck is not None and ck.enable else None
        logger.error(interrupts.interrupted_line(e, folder))
    if "torch.distributed" in sys.modules:
        from titan_aquila.parallel.dist_utils import finish

        finish(code)  # barrier, destroy the group, flush, os._exit: gloo can crash a normal interpreter exit
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
