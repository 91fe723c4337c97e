"""Shared helpers: write small TOML configs and run train.py (plain python or torchrun) as a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}
STEP_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+([0-9.]+|nan|inf)", re.M)
VAL_LINE = re.compile(r"^step\s+(\d+)\s+validation loss\s+([0-9.]+)", re.M)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def tiny_config(tmp: Path, name: str = "run", flavor: str = "debugmodel", overrides: dict | None = None,
                **sections) -> Path:
    """A tiny, fast training config under tmp; `sections` merge into the defaults ({'training': {...}, ...})."""
    base = {
        "job": {"dump_folder": str(tmp / name)},
        "model": {"flavor": flavor, "overrides": {**TINY, **(overrides or {})}},
        "training": {"local_batch_size": 2, "seq_len": 32, "steps": 6, "seed": 7},
        "optimizer": {"lr": 3e-3},
        "lr_scheduler": {"warmup_steps": 2},
        "metrics": {"log_freq": 1, "enable_tensorboard": False},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return write_config(tmp / f"{name}.toml", base)


def run_train(config: Path, *extra: str, nproc: int = 1, timeout: int = 300, env: dict | None = None):
    """Run train.py; returns (returncode, stdout, stderr)."""
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py")]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd + ["--job.config_file", str(config), *extra], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    return p.returncode, p.stdout, p.stderr


def losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP_LINE.findall(stdout)}


def val_losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in VAL_LINE.findall(stdout)}
