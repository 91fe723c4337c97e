"""Grow a checkpoint offline: `python -m titan_aquila.growth --job.config_file STAGE.toml --out DIR [--overwrite]`.

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

from titan_aquila.config import load_job_config
from titan_aquila.errors import exit_on_user_error
from titan_aquila.growth.loader import grow_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_aquila.growth", description=__doc__.split("\n\n")[0],
                                epilog="all other options are job-config options (--job.config_file FILE, ...)")
    p.add_argument("--out", required=True, help="output checkpoint folder (gets step-0/)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        p.print_help()
        return 0
    ns, rest = p.parse_known_args(argv)
    with exit_on_user_error():
        cfg = load_job_config(rest, prog="python -m titan_aquila.growth")
        grow_checkpoint(cfg, ns.out, ns.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
