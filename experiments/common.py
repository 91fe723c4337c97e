"""Shared code of the experiments: presets, one `train.py` stage run in-process, console parsing (report.py: tables,
plots, results.md).

A stage is the real pipeline: a TOML file is written into the run folder (rerun it by hand with
`python train.py --job.config_file RUN/config.toml`) and executed by `train.py`'s own `plan_job` + `train`
(in this process, so that torch is imported once per experiment, not once per stage). Growth happens inside
`train.py` exactly as for a user (`[growth]` + the growth audit, `growth_audit.json`); losses are parsed from the
console lines, which are also kept in RUN/train.log. The stage-0 model is trained by whichever script runs first
(6 min in full mode here) and reused by the others; `--reuse` remakes tables and plots from finished runs.

    FLOPs of a run at step s = ModelArgs.flops_per_token(seq_len) x local_batch_size x seq_len x s
    (the args are the ones train.py builds: the growth plan's dst_args when the stage grows a checkpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # train.py lives at the repository root, not in the package
    sys.path.insert(0, str(REPO))

MOE = dict(n_experts=8, top_k=2, router_order="topk_softmax")  # AquilaMoE / Drop-Upcycling: 8 experts, top-2


@dataclass
class Preset:
    """Sizes of one mode. The 49,152-token vocabulary makes the output layer most of the FLOPs at these widths."""
    shape: dict          # the stage-0 dense model (model.overrides of the debugmodel flavor)
    seq_len: int
    batch: int           # local_batch_size (one process, no accumulation: tokens/step = batch x seq_len)
    stage0_steps: int
    steps: int           # continued-training steps of a grown / upcycled model
    val_steps: int       # validation batches (-1 = the whole held-out split, 8,650 tokens)
    val_batch: int
    val_freq: int
    log_freq: int
    scratch_lr: float = 3e-3
    grown_lr: float = 1e-3  # continued pretraining of a grown model: a smaller peak LR (AquilaMoE Table 3, LEMON)


PRESETS = {
    # smoke: seconds; one KV group so that 2 -> 3 -> 4 heads are all legal
    "smoke": Preset(shape=dict(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32), seq_len=32, batch=2,
                    stage0_steps=30, steps=4, val_steps=2, val_batch=4, val_freq=2, log_freq=2,
                    scratch_lr=1e-2, grown_lr=3e-3),
    "full": Preset(shape=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176), seq_len=128, batch=4,
                   stage0_steps=200, steps=40, val_steps=-1, val_batch=8, val_freq=20, log_freq=5),
}


def describe(s: dict) -> str:
    moe = f", {s['n_experts']} experts top-{s['top_k']}" if s.get("n_experts") else ""
    return (f"dim {s['dim']}, {s['n_layers']} layers, {s['n_heads']} heads ({s['n_kv_heads']} KV), "
            f"FFN {s['ffn_dim']}{moe}")


def scaled(shape: dict, width: float = 1, depth: int = 1, **extra) -> dict:
    """The shape grown `width` times wider (dim, heads, FFN; head_dim and KV groups fixed) and `depth` times deeper."""
    w = lambda x: int(round(x * width))  # noqa: E731
    return {**shape, "dim": w(shape["dim"]), "n_heads": w(shape["n_heads"]), "ffn_dim": w(shape["ffn_dim"]),
            "n_layers": shape["n_layers"] * depth, **extra}


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 36)}


def _heap_malloc() -> None:
    """glibc serves blocks > 32 MiB (every logits tensor of the 49k vocabulary) with a fresh mmap that the kernel
    page-faults and zeroes at every step: a third of the wall time of a full run went to the kernel. Keeping them in
    the heap (30-40% faster steps here) needs the setting at process start, so the script re-executes itself once."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})


def parse_args(doc: str, default_out: str, extra=None) -> argparse.Namespace:
    """The options every experiment shares; `extra(parser)` adds a script's own."""
    _heap_malloc()
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (seconds); outputs only under --out")
    p.add_argument("--out", default=str(REPO / "outputs" / "experiments" / default_out), help="run folders")
    p.add_argument("--docs", default=None,
                   help="where results.md and the PNGs go (default: docs/, or --out with --smoke)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core box)")
    p.add_argument("--fresh", action="store_true", help="retrain the stage-0 model even if --out has a matching one")
    p.add_argument("--reuse", action="store_true",
                   help="reuse every finished run of --out whose config.toml is unchanged (remake tables and plots)")
    p.add_argument("--verbose", action="store_true", help="echo every train.py console line")
    p.add_argument("--steps", type=int, default=None, help="training steps of each compared run (default: the preset)")
    if extra:
        extra(p)
    a = p.parse_args()
    a.out = Path(a.out)
    a.docs = Path(a.docs) if a.docs else (a.out if a.smoke else REPO / "docs")
    a.preset = PRESETS["smoke" if a.smoke else "full"]
    import torch

    torch.set_num_threads(a.threads)
    _once_per_process()
    return a


def _once_per_process() -> None:
    """train.py loads the tokenizer (49k base64 lines) and measures the GEMM peak (used only for the MFU column)
    at every start; an experiment runs a dozen stages in one process, so each is done once (same objects/values)."""
    import functools

    import titan_aquila.metrics as metrics
    import titan_aquila.data.tokenizer as tokenizer

    if not hasattr(tokenizer.Tokenizer, "cache_info"):
        tokenizer.Tokenizer = functools.lru_cache(maxsize=None)(tokenizer.Tokenizer)
        metrics.device_peak_flops = functools.lru_cache(maxsize=None)(metrics.device_peak_flops)


# ---- one stage ------------------------------------------------------------------------------------------------
def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"


def stage_config(run_dir: Path, p: Preset, shape: dict, steps: int, lr: float, *, growth: dict | None = None,
                 init_from: Path | None = None, save: bool = False, seed: int = 42) -> dict:
    """The TOML sections of one stage. growth = {"methods": [...], "source": ckpt dir, extra [growth] keys}."""
    cfg = {
        "job": {"dump_folder": str(run_dir), "description": run_dir.name},
        "model": {"flavor": "debugmodel", "overrides": shape},
        "training": {"local_batch_size": p.batch, "seq_len": p.seq_len, "steps": steps, "max_norm": 1.0, "seed": seed},
        "optimizer": {"lr": lr, "weight_decay": 0.1},
        "lr_scheduler": {"warmup_steps": max(1, steps // 10), "decay_type": "cosine", "min_lr_factor": 0.1},
        "validation": {"enable": True, "freq": p.val_freq, "steps": p.val_steps, "local_batch_size": p.val_batch},
        # only the final, model-only save (a growth source / initial load needs nothing else)
        "checkpoint": {"enable": save, "interval": 10 ** 9, "keep_latest_k": 1, "last_save_model_only": True},
        "metrics": {"log_freq": p.log_freq, "enable_tensorboard": False},
    }
    if growth:
        g = dict(growth)
        cfg["growth"] = {"enable": True, "source_path": str(g.pop("source")), "methods": g.pop("methods"),
                         "audit": True, "audit_steps": p.val_steps if p.val_steps > 0 else 10 ** 6, **g}
    if init_from:
        cfg["checkpoint"]["initial_load_path"] = str(init_from)
    return cfg


@dataclass
class Run:
    name: str
    run_dir: str
    steps: int
    tokens_per_step: int
    flops_per_token: int
    active_params: int
    train: dict = field(default_factory=dict)   # step -> training loss (console lines)
    val: dict = field(default_factory=dict)     # step -> held-out loss; step 0 = growth audit / initial model
    audit: dict | None = None
    wall_s: float = 0.0

    @property
    def checkpoint(self) -> Path:
        return Path(self.run_dir) / "checkpoint"

    def flops(self, step: int) -> float:
        return float(self.flops_per_token) * self.tokens_per_step * step

    def curve(self, which: str = "val", offset: float = 0.0) -> tuple[list, list]:
        """(training FLOPs, loss) points of the held-out ("val") or training ("train") curve, shifted by `offset`."""
        d = self.val if which == "val" else self.train
        return [offset + self.flops(s) for s in d], list(d.values())

    @property
    def init_val(self) -> float:
        return self.val[0]

    @property
    def final_val(self) -> float:
        return self.val[max(self.val)]


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()

    def isatty(self):  # train.py colours its console only at a terminal; the log file must stay parseable
        return False


STEP_RE = re.compile(r"^step\s+(\d+)\s+loss\s+(\S+)")
VAL_RE = re.compile(r"^step\s+(\d+)\s+validation loss\s+(\S+)")


def parse_console(text: str) -> tuple[dict, dict]:
    train, val = {}, {}
    for line in text.splitlines():
        if m := VAL_RE.match(line):
            val[int(m[1])] = float(m[2])
        elif m := STEP_RE.match(line):
            train[int(m[1])] = float(m[2])
    return train, val


def initial_val_loss(cfg, args) -> float:
    """Held-out loss of the model train.py starts from when nothing is loaded: build_model(args, seed) is exactly
    the fresh init of train.py (same seed), evaluated on the same batches as its validation."""
    import torch

    from titan_aquila.data.dataset import build_validation_dataloader
    from titan_aquila.evaluate import validation_loss
    from titan_aquila.models.aquila import build_model
    from titan_aquila.data.tokenizer import Tokenizer

    v = cfg.validation
    loader = build_validation_dataloader(v.dataset_path, Tokenizer(cfg.model.tokenizer_path), cfg.training.seq_len,
                                         v.local_batch_size, 0, 1)
    return validation_loss(build_model(args, device="cpu", seed=cfg.training.seed), loader, torch.device("cpu"),
                           v.steps)[0]


def run_stage(name: str, cfg_dict: dict, a, *, init_val: float | None = None, reuse: bool | None = None) -> Run:
    """Write RUN/config.toml and run it with train.py's functions. `reuse` (default: --reuse): return the recorded
    result of an identical finished config instead of training again. `init_val`: the step-0 held-out loss when the
    run starts from a checkpoint without growth (the loaded model's known loss)."""
    reuse, verbose = a.reuse if reuse is None else reuse, a.verbose
    import train as train_py
    from titan_aquila.checkpoint.manager import resolve_growth
    from titan_aquila.config import load_job_config

    run_dir = Path(cfg_dict["job"]["dump_folder"])
    toml = "\n".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in kv.items())
                     for s, kv in cfg_dict.items())
    record = run_dir / "run.json"
    if reuse and record.exists() and (run_dir / "config.toml").read_text() == toml:
        print(f"[{name}] reusing {run_dir}", flush=True)
        d = json.loads(record.read_text())
        return Run(**{**d, "train": {int(k): v for k, v in d["train"].items()},
                      "val": {int(k): v for k, v in d["val"].items()}})  # JSON keys are strings
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would make train.py resume instead
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(toml)
    cfg = load_job_config(["--job.config_file", str(run_dir / "config.toml")])
    args, dims, accum = train_py.plan_job(cfg)
    plan = resolve_growth(cfg, args)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as log, \
            contextlib.redirect_stdout(_Tee(log, sys.stdout) if verbose else log):
        train_py.train(cfg, args, dims, accum)
    args = plan.dst_args if plan else args  # what train.py built
    train, val = parse_console((run_dir / "train.log").read_text())
    audit = json.loads((run_dir / "growth_audit.json").read_text()) if plan else None
    if audit:
        val[0] = audit["grown_loss"]  # the audit runs on the same held-out batches as validation
    else:
        val[0] = init_val if init_val is not None else initial_val_loss(cfg, args)
    t = cfg.training
    run = Run(name=name, run_dir=str(run_dir), steps=t.steps, tokens_per_step=t.local_batch_size * t.seq_len * accum,
              flops_per_token=args.flops_per_token(t.seq_len), active_params=args.num_params(active=True),
              train=train, val=dict(sorted(val.items())), audit=audit, wall_s=round(time.time() - t0, 1))
    record.write_text(json.dumps(dataclasses.asdict(run), indent=1))
    print(f"[{name}] {run.steps} steps in {run.wall_s:.0f}s: held-out loss {run.init_val:.4f} -> "
          f"{run.final_val:.4f}" + (f"  (audit: source {audit['source_loss']:.4f})" if audit else ""), flush=True)
    return run


def stage0(a) -> Run:
    """The small dense model every experiment starts from, trained from scratch (shared by the three scripts
    when they use the same --out parent: an identical finished config is reused unless --fresh)."""
    p = a.preset
    run_dir = a.out.parent / f"stage0_{'smoke' if a.smoke else 'full'}"
    cfg = stage_config(run_dir, p, p.shape, p.stage0_steps, p.scratch_lr, save=True)
    cfg["validation"]["freq"] = p.stage0_steps // 4  # a curve of 4 points is enough for the source
    return run_stage("stage 0: dense from scratch", cfg, a, reuse=not a.fresh)
