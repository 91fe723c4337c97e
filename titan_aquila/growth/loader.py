"""Growth at load: resolve the plan from `[growth]` (the source shape comes from its checkpoint), then stream the
transforms (growth/stream.py: one destination layer at a time, from the source tensors it needs) into the
(possibly sharded) model, or offline into a new checkpoint, one tensor at a time as it is written.

    plan = resolve_growth(cfg, target_args)   # before the model is built: plan.dst_args is the shape
    load_grown_weights(cfg, model, plan.dst_args, plan)   # layer by layer; each rank writes only its local shards
    grow_checkpoint(cfg, out)                 # offline: `python -m titan_aquila.growth`
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from titan_aquila.checkpoint.storage import (args_diff, check_integrity, check_output_folder, read_checkpoint_args,
                                             read_model_state_dict, resolve_checkpoint_dir, write_model_checkpoint)
from titan_aquila.checkpoint.lineage import carry_forward, check_vocab_fits, checkpoint_tokenizer, resolve_tokenizer
from titan_aquila.checkpoint.weights import check_names, load_model_weights, model_tensors, write_tensor
from titan_aquila.config.validate import job_model_args
from titan_aquila.errors import UserError
from titan_aquila.growth import GrowthOptions, apply_growth, materialize, plan_growth
from titan_aquila.growth.stream import GrowthStream
from titan_aquila.logging import logger
from titan_aquila.models.args import ModelArgs


def growth_options(cfg):
    """GrowthOptions from the `[growth]` config section (fields with the same names)."""
    names = {f.name for f in dataclasses.fields(GrowthOptions)}
    return GrowthOptions(**{k: v for k, v in dataclasses.asdict(cfg.growth).items() if k in names})


def resolve_growth(cfg, target_args: ModelArgs):
    """The validated GrowthPlan (or None when growth is off). Call it BEFORE building the model: the model must
    be built from `plan.dst_args` (a method may adjust fields it owns). The source shape is read from the
    source checkpoint's model_args.json, so a stage never restates it."""
    g = cfg.growth
    if not g.enable:
        return None
    src_args = read_checkpoint_args(g.source_path)
    return plan_growth(list(g.methods), src_args, target_args, growth_options(cfg))


def load_grown_weights(cfg, model: torch.nn.Module, model_args: ModelArgs, plan=None) -> None:
    """Grow the source checkpoint into the (possibly sharded) model, one destination layer at a time: each group
    reads only the source tensors it needs (growth/stream.py) and each rank writes only its local shards."""
    plan = plan if plan is not None else resolve_growth(cfg, model_args)
    diff = args_diff(plan.dst_args, model_args)
    if diff:
        raise UserError("the model was not built from the growth plan's dst_args (build it from "
                        "resolve_growth(cfg, args).dst_args); differs in " +
                        ", ".join(f"{k} ({a} vs {b})" for k, a, b in diff))
    src_dir = resolve_checkpoint_dir(cfg.growth.source_path, "growth.source_path")
    check_integrity(src_dir, cfg.checkpoint.verify_checksums)  # once: the reads below skip the check
    logger.info(f"[growth] growing {src_dir} with {plan.describe()}: {plan.src_args.num_params():,} -> "
        f"{plan.dst_args.num_params():,} parameters, one layer at a time into the local shards")
    stream = growth_stream(plan, src_dir, growth_options(cfg))
    if stream is None:
        load_model_weights(model, apply_growth(plan, read_model_state_dict(src_dir, check=False), growth_options(cfg)))
        return
    template = model_tensors(model)
    check_names(template, stream.names)
    for group in stream.groups():
        for name, value in group.items():
            write_tensor(name, template[name], value)


def growth_stream(plan, src_dir: Path, opts) -> GrowthStream | None:
    """The streamed growth, or None when a transform needs tensor values that its shape-only pass cannot give
    (a value read as a Python number, `.item()` and the like): then every rank grows the whole model."""
    try:
        return GrowthStream(plan, src_dir, opts)
    except (RuntimeError, NotImplementedError) as e:
        logger.warning(f"growth {plan.describe()} cannot stream ({str(e).splitlines()[0][:80]}): every rank "
                       "grows the whole model")
        return None


def plan_stage(cfg, plan) -> dict:
    """The growth stage of a checkpoint's lineage (checkpoint/lineage.py): source, methods and options."""
    return {"kind": "growth", "source": str(resolve_checkpoint_dir(cfg.growth.source_path).resolve()),
            "methods": list(cfg.growth.methods), "growth": plan.describe(),
            "options": dataclasses.asdict(growth_options(cfg)), "seed": cfg.growth.seed,
            "parameters": [plan.src_args.num_params(), plan.dst_args.num_params()]}


def grow_checkpoint(cfg, out: str | Path, overwrite: bool = False) -> Path:
    """Grow cfg.growth.source_path into cfg's target model and write OUT/step-0. Returns the step folder."""
    if not cfg.growth.enable:
        raise UserError("growth.enable is false in this config: set [growth] enable = true, source_path, methods")
    out = Path(out)
    check_output_folder(out, overwrite)  # before any work
    target = job_model_args(cfg)
    plan = resolve_growth(cfg, target)
    src_dir = resolve_checkpoint_dir(cfg.growth.source_path, "growth.source_path")
    check_integrity(src_dir, cfg.checkpoint.verify_checksums)
    t0 = time.time()
    opts = growth_options(cfg)
    stream = growth_stream(plan, src_dir, opts)
    if stream is not None:
        dst_sd = stream.deferred_state_dict()  # each tensor made when DCP writes it
    else:
        dst_sd = {k: materialize(v).contiguous()
                  for k, v in apply_growth(plan, read_model_state_dict(src_dir, check=False), opts).items()}
    # The tokenizer goes with the weights: the given one (checked against the source's), else the source's.
    tok = resolve_tokenizer(cfg.model.tokenizer_path, src_dir, "model.tokenizer_path") \
        if cfg.model.tokenizer_path or checkpoint_tokenizer(src_dir) else None
    if tok is not None:
        check_vocab_fits(tok, plan.dst_args.vocab_size, "the grown model")
    lineage, files = carry_forward(src_dir, tok, plan_stage(cfg, plan))
    meta = {"source": str(src_dir.resolve()), "growth_methods": list(cfg.growth.methods),
            "growth": plan.describe(), "growth_seed": opts.seed, "growth_noise_std": opts.noise_std,
            "lineage": lineage}
    path = write_model_checkpoint(out, dst_sd, plan.dst_args, meta, overwrite, files)
    logger.info(f"grew {src_dir} with {plan.describe()}: {plan.src_args.num_params():,} -> {plan.dst_args.num_params():,} "
        f"parameters in {time.time() - t0:.1f}s -> {path}")
    return path
