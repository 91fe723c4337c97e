"""Shared helpers: write small TOML configs and run train.py (plain python or torchrun) as a real subprocess.

    cfg = tiny_config(tmp_path, training={"steps": 4})
    run = run_train(cfg, "--optimizer.lr", "1e-2", nproc=2)
    assert run.rc == 0, run.err
    run.losses        # {step: loss} from the console lines;  run.val_losses, run.errors likewise
    rc, out, err = run  # it is also a plain 3-tuple
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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
    """Write {section: {key: value}} as TOML (values: bool, int, float, str, list, inline-table dict)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def tiny_config(tmp: Path, name: str = "run", flavor: str = "debugmodel", overrides: dict | None = None,
                **sections) -> Path:
    """A tiny, fast training config under tmp; `sections` merge into the defaults ({'training': {...}, ...}).
    The model is `flavor` with TINY (+ `overrides`) applied: dim 64, 2 layers, 4 heads / 2 KV heads."""
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


def losses(stdout: str) -> dict[int, float]:
    """{step: training loss} from the console lines `step N  loss X ...`."""
    return {int(s): float(v) for s, v in STEP_LINE.findall(stdout)}


def val_losses(stdout: str) -> dict[int, float]:
    """{step: validation loss} from the console lines `step N  validation loss X ...`."""
    return {int(s): float(v) for s, v in VAL_LINE.findall(stdout)}


class TrainRun(NamedTuple):
    """A finished run: unpacks as (rc, out, err); `.losses`, `.val_losses`, `.errors` parse the output."""

    rc: int
    out: str
    err: str

    @property
    def losses(self) -> dict[int, float]:
        return losses(self.out)

    @property
    def val_losses(self) -> dict[int, float]:
        return val_losses(self.out)

    @property
    def errors(self) -> list[str]:
        """The `error: ...` lines on stderr."""
        return [ln for ln in self.err.splitlines() if ln.startswith("error: ")]


def run_script(args: list[str], timeout: int = 300, env: dict | None = None) -> TrainRun:
    """Run `python <args>` from the repository root with the repository importable and one thread per process.
    On timeout the whole process group (torchrun and its workers) is killed, then TimeoutExpired is raised, so a
    hung collective never outlives the test."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=full_env, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(p.args, timeout, out, err) from None
    return TrainRun(p.returncode, out, err)


def torchrun(nproc: int) -> list[str]:
    """The arguments after `python` that start `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU)."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run_train(config: Path | None, *extra: str, nproc: int = 1, timeout: int = 300, env: dict | None = None,
              script: str = "train.py") -> TrainRun:
    """Run `script` (train.py) on `config` with `extra` CLI options: plain python for nproc 1, else torchrun."""
    cfg = [] if config is None else ["--job.config_file", str(config)]
    return run_script([*(torchrun(nproc) if nproc > 1 else []), str(ROOT / script), *cfg, *extra], timeout=timeout,
                      env=env)


def run_workers(test_file: str, *args: str, nproc: int = 2, timeout: int = 240) -> TrainRun:
    """Run a multi-rank test module's own `__main__` worker under torchrun (`test_file` is its `__file__`)."""
    return run_script([*torchrun(nproc), str(Path(test_file).resolve()), *args], timeout=timeout)


def tensorboard_runs(tb_dir: Path) -> list[Path]:
    """The run folders (`tb/<timestamp>`) of a job's TensorBoard folder, oldest first."""
    return sorted(p for p in Path(tb_dir).iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*")))


def read_tensorboard(run_dir: Path):
    """A loaded EventAccumulator of one run folder that keeps every scalar and histogram event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc
