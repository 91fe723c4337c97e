"""Train (or keep training, or grow then train) an Aquila dense/MoE model.

    python train.py --job.config_file train_configs/debug_model.toml
    torchrun --standalone --nproc_per_node=2 train.py --job.config_file train_configs/debug_model.toml

The whole loop, top to bottom: config -> distributed -> model args (+ growth plan) -> model -> parallelize ->
optimizer/schedule -> data -> checkpoint (resume | initial load | grow) -> [growth audit] -> steps -> final save.
"""

from __future__ import annotations

import os
import sys

from titan_aquila.parallel.dist_utils import set_per_rank_inductor_cache

set_per_rank_inductor_cache()  # before torch is imported (cpu-facts trap 2)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titan_aquila.checkpoint import CheckpointManager, resolve_growth  # noqa: E402
from titan_aquila.checkpoint_io import read_model_state_dict, resolve_checkpoint_dir  # noqa: E402
from titan_aquila.config import load_job_config  # noqa: E402
from titan_aquila.data import build_dataloader, build_validation_dataloader  # noqa: E402
from titan_aquila.errors import UserError  # noqa: E402
from titan_aquila.evaluate import growth_audit, validation_loss, write_audit  # noqa: E402
from titan_aquila.metrics import MetricsLogger, device_peak_flops  # noqa: E402
from titan_aquila.models.aquila import build_model  # noqa: E402
from titan_aquila.models.args import build_model_args  # noqa: E402
from titan_aquila.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from titan_aquila.parallel.dist_utils import finish, init_distributed, world_info  # noqa: E402
from titan_aquila.parallel.parallel_dims import ParallelDims  # noqa: E402
from titan_aquila.parallel.parallelize import parallelize_model  # noqa: E402
from titan_aquila.tokenizer import Tokenizer  # noqa: E402
from titan_aquila.train_utils import (collect_expert_load, full_grad_norm, reduce_mean,  # noqa: E402
                                      update_expert_bias)

AUTOCAST = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    if world_info()[0] == 0:
        print(msg, flush=True)


def build_args(cfg):
    """Model args of the config's flavor + overrides; with growth, the plan's final args (read from the source)."""
    args = build_model_args(cfg.model.flavor, {**cfg.model.overrides, "z_loss_type": cfg.moe.z_loss_type})
    if cfg.training.seq_len > args.max_seq_len:
        raise UserError(f"training.seq_len {cfg.training.seq_len} is larger than the model's context "
                        f"max_seq_len {args.max_seq_len}")
    plan = resolve_growth(cfg, args)
    return (plan.dst_args if plan else args), plan


def train(cfg) -> int:
    device = init_distributed()
    rank, _, world = world_info()
    dims = ParallelDims.from_config(cfg.parallelism, world)
    dims.build_mesh(device.type)
    dp_rank, dp_degree = dims.dp_rank(), dims.dp_degree
    dp_group = dims.world_mesh["dp"].get_group() if dims.world_mesh is not None else None
    t = cfg.training
    if t.global_batch_size == -1:
        accum = 1
    elif t.global_batch_size % (t.local_batch_size * dp_degree):
        raise UserError(f"training.global_batch_size {t.global_batch_size} is not a multiple of local_batch_size "
                        f"{t.local_batch_size} x data-parallel degree {dp_degree}")
    else:
        accum = t.global_batch_size // (t.local_batch_size * dp_degree)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)

    args, plan = build_args(cfg)
    tokenizer = Tokenizer(cfg.model.tokenizer_path)
    if args.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocab_size {args.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    train_loader = build_dataloader(t.dataset_path, tokenizer, t.seq_len, t.local_batch_size, dp_rank, dp_degree,
                                    num_workers=t.num_workers, seed=t.seed)
    v = cfg.validation
    val_loader = build_validation_dataloader(v.dataset_path, tokenizer, t.seq_len, v.local_batch_size if
                                             v.local_batch_size > 0 else t.local_batch_size, dp_rank, dp_degree) \
        if v.enable or (plan is not None and cfg.growth.audit) else None

    # Every rank builds the same full model from the same seed, then parallelize shards it: 1-rank and N-rank runs
    # start from identical weights. (Models too big for one host memory would build on "meta" and init per shard.)
    model = build_model(args, device="cpu", seed=t.seed)
    log(f"model {cfg.model.flavor}{' + overrides' if cfg.model.overrides else ''}"
        f"{' grown by ' + plan.describe() if plan else ''}: {args.num_params():,} parameters "
        f"({args.num_params(active=True):,} active), {args.flops_per_token(t.seq_len) / 1e6:.1f} MFLOP/token")
    model = parallelize_model(model, dims, cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg)
    ckpt = CheckpointManager(cfg, model, optimizer, scheduler, train_loader, args, dims, growth_plan=plan,
                             dp_rank=dp_rank, dp_degree=dp_degree)
    start = ckpt.load()
    if plan is not None and start == 0 and cfg.growth.audit:
        src = build_model(plan.src_args, device="cpu")
        src.load_state_dict(read_model_state_dict(resolve_checkpoint_dir(cfg.growth.source_path)), strict=True)
        audit = {"methods": plan.describe(), **growth_audit(src.to(device), model, val_loader, device,
                                                            cfg.growth.audit_steps, group=dp_group)}
        del src
        log(f"growth audit ({audit['methods']}): source loss {audit['source_loss']:.4f}  grown loss "
            f"{audit['grown_loss']:.4f}  max |logit diff| {audit['max_logit_diff']:.3e}")
        if rank == 0:
            write_audit(cfg.job.dump_folder, audit)

    autocast_dtype = AUTOCAST[t.autocast_dtype]
    peak, peak_desc = device_peak_flops(device, autocast_dtype or torch.float32)
    log(f"peak {peak / 1e9:,.1f} GFLOP/s per device ({peak_desc}); gradient accumulation {accum}; "
        f"global batch {t.local_batch_size * dp_degree * accum} x {t.seq_len} tokens")
    metrics = MetricsLogger(cfg, rank, args.flops_per_token(t.seq_len), peak, world)
    if plan is not None and start == 0 and cfg.growth.audit:
        metrics.write(0, {"growth/source_loss": audit["source_loss"], "growth/grown_loss": audit["grown_loss"],
                          "growth/max_logit_diff": audit["max_logit_diff"]})

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    data_iter = iter(train_loader)  # after ckpt.load(): the restored position applies to a fresh iterator
    m = cfg.moe
    for step in range(start + 1, t.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=device)  # ce, load balance, router z (means over micro-batches)
        for _ in range(accum):
            inputs, labels = next(data_iter)
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast():
                logits, aux = model(inputs)
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            loss = ce + m.load_balance_coeff * aux[0] + m.z_loss_coeff * aux[1]
            if m.z_loss_type == "output_max":  # Baichuan-style max-z on the LM logits
                z_out = logits.float().max(dim=-1).values.pow(2).mean()
                loss = loss + m.z_loss_coeff * z_out
                aux = torch.stack([aux[0], z_out.detach()])
            (loss / accum).backward()
            sums += torch.stack([ce.detach(), aux[0].detach(), aux[1].detach()]) / accum
            metrics.add_tokens(inputs.numel() * dp_degree)
        grad_norm = full_grad_norm(model, t.max_norm)
        sums = reduce_mean(sums, dp_group)
        if not (torch.isfinite(sums[0]) and torch.isfinite(grad_norm)):
            msg = f"non-finite loss {sums[0].item()} or grad norm {grad_norm.item()} at step {step}"
            if t.on_nonfinite == "stop":
                raise UserError(msg + " (training.on_nonfinite = 'stop')")
            log(f"warning: {msg}; skipping the optimizer step (training.on_nonfinite = 'skip')")
            collect_expert_load(model, dp_group)  # discard this step's routing counts
            continue
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        load = collect_expert_load(model, dp_group)
        if m.bias_update_rate > 0:
            update_expert_bias(model, load, m.bias_update_rate)

        if metrics.should_log(step):
            scalars = {"loss/ce": sums[0].item(), "lr": lr, "grad_norm": grad_norm.item()}
            if args.is_moe:
                scalars.update({"loss/load_balance": sums[1].item(), "loss/router_z": sums[2].item()})
            fracs = {layer: (c / c.sum().clamp(min=1)).tolist() for layer, c in load.items()}
            metrics.log_step(step, scalars, fracs, device)
        if v.enable and (step % v.freq == 0 or step == t.steps):
            val, n = validation_loss(model, val_loader, device, v.steps, autocast(), group=dp_group)
            metrics.log_validation(step, val, n)
        ckpt.maybe_save(step)

    ckpt.maybe_save(t.steps, force=True)
    ckpt.close()
    metrics.close()
    return 0


def main(argv: list[str]) -> None:
    code = 0
    try:
        cfg = load_job_config(argv)
        code = train(cfg)
    except UserError as e:
        if world_info()[0] == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as e:  # --help
        code = e.code if isinstance(e.code, int) else 0
    finish(code)


if __name__ == "__main__":
    main(sys.argv[1:])
