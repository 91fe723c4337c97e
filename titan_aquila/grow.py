"""Grow a checkpoint offline: `python -m titan_aquila.grow --job.config_file STAGE.toml --out DIR [--overwrite]`.

Reads the stage config's target `[model]` (flavor + overrides) and `[growth]` (source_path, methods, options), the
source checkpoint's model_args.json and weights, runs plan_growth + apply_growth (LazyExperts materialised), and
writes a model-only step-0 checkpoint DIR/step-0 with the grown model's args (plan.dst_args). That folder is a
valid `checkpoint.initial_load_path` (or `growth.source_path` of a later stage), so a large growth can be done
once instead of at every training start. Every other option of the config (`--section.key value`) is accepted.
Mistakes print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from titan_aquila.checkpoint_io import (check_integrity, check_output_folder, read_model_state_dict,
                                        resolve_checkpoint_dir, write_model_checkpoint)
from titan_aquila.checkpoint_weights import growth_options, resolve_growth
from titan_aquila.config import load_job_config
from titan_aquila.errors import UserError, exit_on_user_error
from titan_aquila.growth import apply_growth, materialize
from titan_aquila.models.args import build_model_args


def grow_checkpoint(cfg, out: str | Path, overwrite: bool = False, log=print) -> Path:
    """Grow cfg.growth.source_path into cfg's target model and write OUT/step-0. Returns the step folder."""
    if not cfg.growth.enable:
        raise UserError("growth.enable is false in this config: set [growth] enable = true, source_path, methods")
    out = Path(out)
    check_output_folder(out, overwrite)  # before any work
    target = build_model_args(cfg.model.flavor, {**cfg.model.overrides, "z_loss_type": cfg.moe.z_loss_type})
    plan = resolve_growth(cfg, target)
    src_dir = resolve_checkpoint_dir(cfg.growth.source_path, "growth.source_path")
    check_integrity(src_dir)
    t0 = time.time()
    src_sd = read_model_state_dict(src_dir)
    opts = growth_options(cfg)
    grown = apply_growth(plan, src_sd, opts)
    del src_sd  # the source tensors no output aliases are freed before the (largest) write phase
    dst_sd = {}
    for k in list(grown):  # pop as we go: a LazyExperts and its materialised copy are never both alive for long
        dst_sd[k] = materialize(grown.pop(k)).contiguous()
    meta = {"source": str(src_dir.resolve()), "growth_methods": list(cfg.growth.methods),
            "growth": plan.describe(), "growth_seed": opts.seed, "growth_noise_std": opts.noise_std}
    path = write_model_checkpoint(out, dst_sd, plan.dst_args, meta, overwrite)
    log(f"grew {src_dir} with {plan.describe()}: {plan.src_args.num_params():,} -> {plan.dst_args.num_params():,} "
        f"parameters in {time.time() - t0:.1f}s -> {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_aquila.grow", description=__doc__.split("\n\n")[0],
                                epilog="all other options are job-config options (--job.config_file FILE, ...)")
    p.add_argument("--out", required=True, help="output checkpoint folder (gets step-0/)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        p.print_help()
        return 0
    ns, rest = p.parse_known_args(argv)
    with exit_on_user_error():
        cfg = load_job_config(rest, prog="python -m titan_aquila.grow")
        grow_checkpoint(cfg, ns.out, ns.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
